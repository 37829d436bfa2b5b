"""`bench.jobs`' figures and its Markdown: a job's rows/s against the closed loop, and the
realtime p99 beside it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np

from bench.report import heading, machine
from bench.result import Percentiles

WINDOW_S = 2.0
"""Seconds of one window of realtime requests whose p99 is taken on its own."""
TARGET_RATIO = 0.8
"""Issue 19: a job finishes at >= 0.8 x the mesh's closed-loop rows/s."""


@dataclass(frozen=True)
class JobRun:
    """One submission of every row (one job per body) until the last 303."""

    jobs: int
    rows: int
    began: float
    """Epoch s before the first POST."""
    accepted: float
    """Epoch s after the last 202."""
    done: float
    """Epoch s of the GET that saw the last 303."""
    failed_rows: int
    runner_seconds: list[float]
    """Per job, finished_at − started_at from its status."""

    @property
    def seconds(self) -> float:
        return self.done - self.began

    @property
    def rows_per_s(self) -> float:
        """From the first POST to the last 303 (upload and validation included)."""
        return self.rows / self.seconds

    @property
    def rows_per_s_after_202(self) -> float:
        return self.rows / (self.done - self.accepted)


@dataclass(frozen=True)
class Realtime:
    """The realtime open loop's requests sent inside a window."""

    rate: float
    requests: int
    failed: int
    """Non-2xx answers, failed streams and requests never answered."""
    latency: Percentiles
    seconds: float
    window_p99: list[float] = field(default_factory=list)
    complete: bool = True
    """Whether the open loop lasted as long as what it was measured beside."""
    """The p99 ms of each `WINDOW_S` window: one stall (a checkpoint, a GC, a client bunching)
    moves the p99 of a whole run, and of one window only; their median is the steadier figure."""

    @property
    def median_window_p99(self) -> float:
        return float(np.median(self.window_p99)) if self.window_p99 else float("nan")

    @property
    def window_quartiles(self) -> tuple[float, float]:
        if not self.window_p99:
            return float("nan"), float("nan")
        low, high = np.percentile(self.window_p99, [25.0, 75.0])
        return float(low), float(high)


@dataclass
class JobsReport:
    command: str
    started: datetime
    realtime_fraction: float
    capacity_rows_per_s: float = 0.0
    job_alone: JobRun | None = None
    realtime_upload: Realtime | None = None
    """The open loop while the job's body goes up (POST to 202), the job then cancelled."""
    realtime_alone: list[Realtime] = field(default_factory=list)
    """Realtime alone before each run beside the job, and once after the last."""
    job_beside: list[JobRun] = field(default_factory=list)
    realtime_beside: list[Realtime] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _job_row(self, label: str, job: JobRun | None) -> str:
        if job is None:
            return f"| {label} | not run | | | | |"
        ratio = job.rows_per_s / self.capacity_rows_per_s if self.capacity_rows_per_s else 0.0
        verdict = "ok" if ratio >= TARGET_RATIO else f"under {TARGET_RATIO}"
        runner = ", ".join(f"{s:.1f}" for s in job.runner_seconds)
        return (f"| {label} | {job.rows:,} in {job.jobs} job(s) | {job.seconds:.1f} "
                f"| {job.rows_per_s:,.0f} ({job.rows_per_s_after_202:,.0f} after the 202) "
                f"| {ratio:.2f} ({verdict}) | {runner} | {job.failed_rows} |")

    def _realtime_row(self, label: str, run: Realtime | None) -> str:
        if run is None:
            return f"| {label} | not run | | | | | |"
        low, high = run.window_quartiles
        return (f"| {label} | {run.rate:,.0f} | {run.requests / run.seconds:,.0f} "
                f"| {run.latency.p50:.2f} | {run.latency.p99:.2f} "
                f"| {run.median_window_p99:.2f} ({low:.2f}-{high:.2f}) | {run.failed} |")

    def markdown(self) -> str:
        lines = [*heading(self.command, self.started),
                 f"Closed loop (wrk c=64, one row per request): "
                 f"{self.capacity_rows_per_s:,.0f} rows/s.", "",
                 "| job | rows | s to 303 | rows/s | ÷ closed loop | runner s | failed rows |",
                 "|---|---|---|---|---|---|---|", self._job_row("alone", self.job_alone),
                 *(self._job_row(f"beside realtime ({turn})", job)
                   for turn, job in enumerate(self.job_beside, 1)), "",
                 f"| realtime ({self.realtime_fraction:.0%} of capacity) | offered req/s "
                 "| sent req/s | p50 ms | p99 ms | p99 of 2 s windows: median (quartiles) ms "
                 "| failed |", "|---|---|---|---|---|---|---|",
                 self._realtime_row("during the upload (POST to 202)", self.realtime_upload)]
        for turn, alone in enumerate(self.realtime_alone):
            lines.append(self._realtime_row(f"alone ({turn + 1})", alone))
            if turn < len(self.realtime_beside):
                lines.append(self._realtime_row(f"beside the job ({turn + 1})",
                                                self.realtime_beside[turn]))
        lines += ["", self._job_verdict(), self._window_verdict()]
        if not all(run.complete for run in self.realtime_beside):
            lines += ["", "An open loop ended before its job: a realtime window is cut short."]
        return "\n".join([*lines, *self.notes])

    def _job_verdict(self) -> str:
        if not self.job_beside or not self.capacity_rows_per_s:
            return "No job ran beside realtime."
        ratios = [job.rows_per_s / self.capacity_rows_per_s for job in self.job_beside]
        verdict = "ok" if min(ratios) >= TARGET_RATIO else f"under {TARGET_RATIO}"
        return (f"Job beside realtime ÷ closed loop: {', '.join(f'{r:.2f}' for r in ratios)} "
                f"(lowest {min(ratios):.2f}: {verdict}).")

    def _window_verdict(self) -> str:
        """The windows' median p99 beside the job against the windows alone (every run before
        and after, pooled): 'keeps its p99' when no higher than their upper quartile."""
        alone = [p for run in self.realtime_alone for p in run.window_p99]
        beside = [p for run in self.realtime_beside for p in run.window_p99]
        if not alone or not beside:
            return "Too few 2 s windows to compare."
        median, upper = float(np.median(alone)), float(np.percentile(alone, 75.0))
        beside_median = float(np.median(beside))
        verdict = "keeps its p99" if beside_median <= upper else "p99 higher"
        return (f"Realtime p99 of 2 s windows: beside the job (every run, {len(beside)} "
                f"windows) median {beside_median:.2f} ms; alone ({len(alone)} windows) median "
                f"{median:.2f}, upper quartile {upper:.2f} ms: {verdict} "
                f"(÷ median alone {beside_median / median:.2f}).")

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.update(started=self.started.isoformat(), machine=machine())
        ratio = 1 / self.capacity_rows_per_s if self.capacity_rows_per_s else 0.0
        if self.job_alone is not None:
            data["job_alone"].update(rows_per_s=self.job_alone.rows_per_s,
                                     ratio=self.job_alone.rows_per_s * ratio)
        for job, entry in zip(self.job_beside, data["job_beside"], strict=True):
            entry.update(rows_per_s=job.rows_per_s, ratio=job.rows_per_s * ratio)
        return data
