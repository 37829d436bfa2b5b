"""The result shape every load generator in ``bench`` returns, and how it is summarised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Percentiles:
    """Latency percentiles in milliseconds (``p999`` is ``None`` where the tool cannot tell)."""

    p50: float
    p99: float
    p999: float | None
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float] | np.ndarray) -> Percentiles:
        """Summarise durations given in seconds; an empty sample gives NaNs."""
        if len(seconds) == 0:
            nan = float("nan")
            return cls(nan, nan, nan, nan)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p99, p999 = np.percentile(ms, [50.0, 99.0, 99.9])
        return cls(float(p50), float(p99), float(p999), float(ms.max()))

    def text(self) -> str:
        """Return ``p50/p99/p99.9/max`` as a compact human string."""
        p999 = "n/a" if self.p999 is None else f"{self.p999:.2f}"
        return f"p50 {self.p50:.2f} p99 {self.p99:.2f} p99.9 {p999} max {self.max:.2f} ms"


@dataclass
class LoadResult:
    """Outcome of one load run against one model, whatever tool produced it.

    ``requests`` counts every request that finished inside the measured window (successes and
    errors); ``rps`` counts successes only. ``send_lag`` is set by open-loop runs: how late the
    client sent each request relative to its scheduled Poisson arrival time.
    """

    tool: str
    mode: str
    model: str
    url: str
    duration_s: float
    requests: int
    errors: int
    rps: float
    latency: Percentiles
    rows_per_request: int = 1
    concurrency: int | None = None
    offered_rate: float | None = None
    send_lag: Percentiles | None = None
    client_cpu: float | None = None
    """Share of one core the Python client itself used over the run (1.0 = a full core)."""
    error_samples: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        """Successful rows per second (``rps`` times rows per request)."""
        return self.rps * self.rows_per_request

    def summary_line(self) -> str:
        """Return a one-line human summary."""
        load = (
            f"c={self.concurrency}"
            if self.offered_rate is None
            else f"rate={self.offered_rate:g}/s"
        )
        line = (
            f"{self.tool} {self.mode} {self.model} {load} rows={self.rows_per_request}: "
            f"{self.rps:.0f} req/s, {self.latency.text()}, "
            f"{self.errors} errors / {self.requests} requests in {self.duration_s:.1f}s"
        )
        if self.send_lag is not None:
            line += f"; send lag p50 {self.send_lag.p50:.2f} p99 {self.send_lag.p99:.2f}"
            line += f" max {self.send_lag.max:.2f} ms"
        if self.client_cpu is not None:
            line += f"; client CPU {self.client_cpu:.0%}"
        if self.error_samples:
            line += f"; first error: {self.error_samples[0]}"
        return line

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dict (NaN percentiles become ``None``)."""
        data = asdict(self)
        data["rows_per_s"] = self.rows_per_s
        for key in ("latency", "send_lag"):
            if data[key] is not None:
                data[key] = {k: _finite(v) for k, v in data[key].items()}
        return data


def _finite(value: float | None) -> float | None:
    if value is None or value != value:  # NaN compares unequal to itself
        return None
    return round(value, 4)


class ErrorLog:
    """Counts failed requests and keeps the first few distinct messages."""

    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []

    def add(self, message: str) -> None:
        """Count one failure and remember its message if it is new and there is room."""
        self.count += 1
        if len(self.samples) < MAX_ERROR_SAMPLES and message not in self.samples:
            self.samples.append(message)
