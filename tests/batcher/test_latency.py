"""The latency model: a line a·rows + b fitted online (Theil–Sen over a sliding window),
seeded from warm-up timings, robust to outliers; and its per-version aggregate."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest

from services.batcher import latency
from services.batcher.latency import LatencyModel, VersionLatency, theil_sen

PER_ROW, FIXED = 0.002, 0.005
"""The synthetic worker: 2 ms per row plus 5 ms per batch."""


def _synthetic(seed: int, count: int) -> list[tuple[int, float]]:
    """Batches of 1..32 rows at 5 % Gaussian noise; one in five is an outlier taking 3-10×
    as long (a GC pause, a neighbour's burst)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        rows = int(rng.integers(1, 33))
        seconds = (PER_ROW * rows + FIXED) * (1 + 0.05 * rng.standard_normal())
        if rng.random() < 0.2:
            seconds *= rng.uniform(3, 10)
        batches.append((rows, seconds))
    return batches


@pytest.mark.parametrize("seed", range(20))
def test_the_fit_converges_on_noisy_timings_with_outliers(seed: int) -> None:
    model = LatencyModel()
    for rows, seconds in _synthetic(seed, 300):
        model.observe(rows, seconds)
    # Tolerance: 3 ms at 1 row (truth 7 ms), 4 ms at 32 rows (truth 69 ms, 6 %). The window
    # holds 64 batches, ~13 of them outliers (binomial, sd 3.2): under Theil–Sen's 29 %
    # breakdown point, and dropped by the 3-MAD refit. The clean noise is 5 % of ~38 ms on
    # average, sd ~1.9 ms; a fitted line's standard error over ~50 inliers of rows 1..32 is
    # sd·sqrt(1/n + (x - 16.5)²/Sxx) ~ 0.55 ms at both ends, Theil–Sen somewhat less
    # efficient, and the 32-row end also carries the slope's bias from noise proportional to
    # the time: 3-4 ms is ~5 such errors. The seeds are fixed, so the test is exact (over 500
    # seeds the worst misses were 1.3 ms and 3.0 ms).
    for rows, tolerance in ((1, 0.003), (32, 0.004)):
        truth = PER_ROW * rows + FIXED
        predicted = model.predict(rows)
        assert predicted is not None
        assert abs(predicted - truth) <= tolerance, (rows, predicted, truth)


def test_plain_least_squares_would_be_thrown_off_by_the_same_outliers() -> None:
    """Why the fit is robust: least squares over the same window misses by far more."""
    window = _synthetic(0, 300)[-64:]
    rows = np.array([r for r, _ in window], dtype=float)
    seconds = np.array([s for _, s in window])
    slope, intercept = np.polyfit(rows, seconds, 1)
    truth = PER_ROW * 32 + FIXED
    assert abs(slope * 32 + intercept - truth) > 0.25 * truth
    robust_slope, robust_intercept = theil_sen(window)
    assert abs(robust_slope * 32 + robust_intercept - truth) <= 0.10 * truth


def test_nothing_is_known_before_a_batch_or_a_warm_up() -> None:
    assert LatencyModel().predict(8) is None


def test_warm_up_timings_seed_the_model_until_real_batches_replace_them() -> None:
    model = LatencyModel(min_batches=8)
    model.seed({1: 0.011, 8: 0.018, 32: 0.042})  # 1 ms per row + 10 ms
    assert model.predict(16) == pytest.approx(0.026)
    for rows in (1, 2, 4, 8) * 2:  # the worker is twice as fast as its warm-up said
        model.observe(rows, 0.0005 * rows + 0.005)
    assert model.predict(16) == pytest.approx(0.013)


def test_one_batch_size_and_no_warm_up_is_a_line_through_the_origin() -> None:
    model = LatencyModel()
    for _ in range(5):
        model.observe(4, 0.008)
    assert model.predict(4) == pytest.approx(0.008)
    assert model.predict(8) == pytest.approx(0.016)  # pessimistic until larger batches run


def test_coefficients_are_never_negative() -> None:
    # Larger batches timed faster (noise): the slope is held at 0, never below.
    slope, intercept = theil_sen([(1, 0.010), (8, 0.009), (16, 0.008), (32, 0.007)])
    assert slope == 0.0 and intercept > 0
    # A line that would cross below zero at 0 rows: the intercept is held at 0.
    slope, intercept = theil_sen([(10, 0.001), (20, 0.011), (30, 0.021)])
    assert intercept == 0.0 and slope > 0


def test_the_version_model_stands_in_for_a_worker_not_yet_timed() -> None:
    latency = VersionLatency()
    for rows in (1, 2, 4, 8, 16, 32, 1, 2):
        latency.observe("w1", rows, 0.001 * rows + 0.002)
    assert latency.predict("w2", 8) == pytest.approx(0.010)
    assert latency.predict("w1", 8) == pytest.approx(0.010)
    # Two workers of the same speed double the throughput: 32 rows per 34 ms each.
    assert latency.throughput(["w1", "w2"], 32) == pytest.approx(2 * 32 / 0.034)
    assert VersionLatency().throughput(["w1"], 32) is None


def test_a_quick_model_is_refitted_every_16_batches_but_at_most_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Thousands of small batches a second must not mean a Theil–Sen fit every 16 of them;
    a window that turned over is refitted whatever the clock says."""
    fits: list[int] = []
    real = latency.theil_sen

    def counted(points: Iterable[tuple[int, float]]) -> tuple[float, float]:
        fits.append(1)
        return real(points)

    monkeypatch.setattr(latency, "theil_sen", counted)
    now = [100.0]
    model = LatencyModel(clock=lambda: now[0])

    def batches(count: int, *, apart: float = 0.0) -> int:
        fits.clear()
        for i in range(count):
            now[0] += apart
            model.observe(1 + i % 8, 0.001 * (1 + i % 8) + 0.002)
            assert model.predict(4) is not None  # the batcher predicts after every batch
        return len(fits)

    # Slow batches: each of the first 8 (the window is young), then every 16th: 24, 40, 56.
    assert batches(56, apart=latency.REFIT_INTERVAL) == latency.MIN_BATCHES + 3
    now[0] += latency.REFIT_INTERVAL / 2
    assert batches(latency.WINDOW - 1) == 0  # too soon since the last fit
    assert batches(1) == 1  # the whole window is new since then
    now[0] += 1.5 * latency.REFIT_INTERVAL
    assert batches(latency.REFIT_EVERY - 1) == 0
    assert batches(1) == 1
