"""How long a worker takes for a batch of n rows: a line a·rows + b fitted online.

The fit is Theil–Sen over a sliding window of recent batches (the median of the slopes between
every pair of batches of different sizes, then the median intercept): up to ~29 % of the
window can be outliers (a GC pause, a neighbour's burst) without moving the line. Both
coefficients are held ≥ 0, so a larger batch is never predicted faster than a smaller one.

Until real batches arrive the line is fitted to the worker's warm-up sweep (rows → seconds);
while the window holds fewer than `min_batches` batches or only one batch size, the warm-up
points are fitted together with them. With one batch size and no warm-up the line goes
through the origin (a = t / rows, b = 0): pessimistic for larger batches, so admission errs
on refusing rather than on missing deadlines until larger batches have been seen.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

import numpy as np

WINDOW = 64
MIN_BATCHES = 8
REFIT_EVERY = 16
"""Batches observed between two refits once the line is fitted. A Theil-Sen fit of a full
window costs ~0.1 ms; refitting after every batch cost the batcher 14 % of its CPU at c=64 on
the mlp (py-spy, 2026-12-06), and the line moves little in 16 of 64 batches."""
REFIT_INTERVAL = 0.1
"""...and at least this many seconds between two refits, unless the whole window turned over
since the last one. A quick model runs thousands of small batches a second: at one request in
flight the mlp's two models (the worker's and the version's) were refitted every 16 batches,
~4 % of fused mode's CPU (py-spy, 2026-12-08); a slow one (the encoder) takes longer than this
for 16 batches, so nothing changes for it."""


class LatencyModel:
    """Execution seconds of one worker (or one version) as a function of batch rows."""

    __slots__ = ("_clock", "_coef", "_fitted_at", "_min_batches", "_seeds", "_stale", "_window")

    def __init__(
        self, *, window: int = WINDOW, min_batches: int = MIN_BATCHES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window: deque[tuple[int, float]] = deque(maxlen=window)
        self._seeds: tuple[tuple[int, float], ...] = ()
        self._min_batches = min_batches
        self._coef: tuple[float, float] | None = None
        """The fitted (a, b), or None when it must be refitted before use."""
        self._stale = 0
        """Batches observed since the last fit."""
        self._clock = clock
        self._fitted_at = -float("inf")
        """When the line was last fitted (`clock`)."""

    def seed(self, timings: Mapping[int, float]) -> None:
        """Warm-up timings (rows → seconds), used until enough real batches arrive."""
        self._seeds = tuple(
            (int(rows), float(seconds)) for rows, seconds in timings.items()
            if rows > 0 and seconds >= 0
        )
        self._coef = None

    def observe(self, rows: int, seconds: float) -> None:
        """One batch of `rows` rows took `seconds` to execute."""
        if rows > 0 and seconds >= 0:
            self._window.append((rows, seconds))
            self._stale += 1
            # Refit at once while the window is young (the first batches move the line
            # most), then every REFIT_EVERY batches and REFIT_INTERVAL seconds, or once the
            # window turned over.
            if len(self._window) <= self._min_batches or self._stale >= len(self._window) or (
                self._stale >= REFIT_EVERY
                and self._clock() - self._fitted_at >= REFIT_INTERVAL
            ):
                self._coef = None

    @property
    def known(self) -> bool:
        return bool(self._window or self._seeds)

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b) of seconds = a·rows + b, or None when nothing is known yet."""
        if self._coef is None and self.known:
            self._coef = theil_sen(self._points())
            self._stale = 0
            self._fitted_at = self._clock()
        return self._coef

    def predict(self, rows: int) -> float | None:
        """Predicted execution seconds of a batch of `rows` rows (None: nothing known yet)."""
        coef = self.coefficients()
        if coef is None:
            return None
        return coef[0] * rows + coef[1]

    def _points(self) -> list[tuple[int, float]]:
        window = list(self._window)
        sizes = {rows for rows, _ in window}
        if len(window) >= self._min_batches and len(sizes) > 1:
            return window
        return window + list(self._seeds)


def theil_sen(points: Iterable[tuple[int, float]]) -> tuple[float, float]:
    """Median-of-slopes line through `points` (rows, seconds), with a ≥ 0 and b ≥ 0; refitted
    without the points more than 3 MADs off the first line (stalls only ever add time, so
    they would bias the median intercept upwards)."""
    data = np.asarray(list(points), dtype=np.float64)
    rows, seconds = data[:, 0], data[:, 1]
    slope, intercept = _theil_sen(rows, seconds)
    residuals = seconds - (slope * rows + intercept)
    centre = np.median(residuals)
    spread = 1.4826 * float(np.median(np.abs(residuals - centre)))
    inliers = np.abs(residuals - centre) <= 3 * spread
    if spread > 0 and 2 <= inliers.sum() < len(rows):
        return _theil_sen(rows[inliers], seconds[inliers])
    return slope, intercept


def _theil_sen(
    rows: np.ndarray[tuple[int], np.dtype[np.float64]],
    seconds: np.ndarray[tuple[int], np.dtype[np.float64]],
) -> tuple[float, float]:
    d_rows = rows[:, None] - rows[None, :]
    upper = d_rows > 0
    if not upper.any():  # one batch size: a line through the origin (see the module doc)
        return float(np.median(seconds / rows)), 0.0
    slopes = (seconds[:, None] - seconds[None, :])[upper] / d_rows[upper]
    slope = max(float(np.median(slopes)), 0.0)
    intercept = float(np.median(seconds - slope * rows))
    if intercept < 0.0:  # keep the line above zero: refit the slope through the origin
        intercept = 0.0
        slope = float(np.median(seconds / rows))
    return slope, intercept


class VersionLatency:
    """The latency models of one (model, version): one per worker, and one over all of them
    (for a worker not yet timed, and for admission)."""

    __slots__ = ("_clock", "overall", "workers")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.overall = LatencyModel(clock=clock)
        self.workers: dict[str, LatencyModel] = {}

    def worker(self, key: str) -> LatencyModel:
        model = self.workers.get(key)
        if model is None:
            model = self.workers[key] = LatencyModel(clock=self._clock)
        return model

    def seed(self, key: str, timings: Mapping[int, float]) -> None:
        """A worker's warm-up timings; the first worker's also seed the version's model."""
        if not timings:
            return
        self.worker(key).seed(timings)
        if not self.overall.known:
            self.overall.seed(timings)

    def observe(self, key: str, rows: int, seconds: float) -> None:
        self.worker(key).observe(rows, seconds)
        self.overall.observe(rows, seconds)

    def predict(self, key: str | None, rows: int) -> float | None:
        """Seconds for a batch of `rows` on worker `key` (its own model when it has one,
        else the version's); None when nothing is known."""
        model = self.workers.get(key) if key is not None else None
        if model is not None and model.known:
            return model.predict(rows)
        return self.overall.predict(rows)

    def throughput(self, keys: Iterable[str], max_batch_size: int) -> float | None:
        """Rows per second the workers `keys` sustain together at full batches (None: no
        model yet)."""
        total = 0.0
        for key in keys:
            seconds = self.predict(key, max_batch_size)
            if seconds is None:
                return None
            total += max_batch_size / max(seconds, 1e-6)
        return total or None
