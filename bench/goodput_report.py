"""The ``bench.goodput`` report: one row per open-loop run, goodput ratios between modes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from bench.goodput_stats import Measurement
from bench.report import heading, machine
from bench.result import LoadResult

TABLE_HEADINGS = (
    "round", "pattern", "load ×", "mode", "asked / sent req/s", "goodput req/s",
    "goodput ÷ capacity", "bound ÷ capacity",
    "attainment of admitted", "refused 503", "504", "other errors (no answer)",
    "late 200s (max ms over)", "admitted p50 / p99 ms", "h2load CPU s",
)  # fmt: skip


@dataclass
class GoodputReport:
    """Everything one ``bench.goodput`` invocation measured."""

    command: str
    started: datetime
    model: str
    setup: str
    deadlines: Sequence[float]
    capacity: LoadResult | None = None
    duties: dict[str, float] = field(default_factory=dict)
    """Share of each period in which a pattern's requests arrive (1.0: uniform)."""
    period_s: float = 1.0
    runs: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def capacity_rps(self) -> float:
        return self.capacity.rps if self.capacity else 0.0

    def line(self, run: Measurement) -> str:
        """A one-line summary of a run, for the progress output."""
        total, latency = run.total, run.admitted_latency
        return (f"{run.pattern} {run.load:g}x {run.mode}: offered {run.offered:,.0f}/s, "
                f"goodput {run.goodput:,.0f}/s, attainment {_pct(total.attainment)}, "
                f"503 {_pct(total.share(total.refused))}, 504 {_pct(total.share(total.expired))}, "
                f"late 200s {total.late}, p50/p99 {latency.p50:.1f}/{latency.p99:.1f} ms, "
                f"h2load CPU {run.client_cpu_s:.2f}s")  # fmt: skip

    def bound(self, run: Measurement) -> float:
        """The most goodput any scheduler could deliver in this run, ÷ capacity (see
        `goodput_bound`)."""
        duty = self.duties.get(run.pattern, 1.0)
        return goodput_bound(run.load, duty=duty, period_s=self.period_s,
                             longest_deadline_s=max(self.deadlines, default=0.0))

    def row(self, run: Measurement) -> str:
        total, latency = run.total, run.admitted_latency
        capacity = run.goodput / self.capacity_rps if self.capacity_rps else float("nan")
        cells = [
            str(run.round), run.pattern, f"{run.load:g}", run.mode,
            f"{run.load * self.capacity_rps:,.0f} / {run.offered:,.0f}",
            f"{run.goodput:,.0f}", f"{capacity:.2f}", f"{self.bound(run):.2f}",
            _pct(total.attainment),
            _pct(total.share(total.refused)), _pct(total.share(total.expired)),
            f"{total.failed} ({run.unanswered})", f"{total.late} ({total.max_late_ms:.1f})",
            f"{latency.p50:.1f} / {latency.p99:.1f}", f"{run.client_cpu_s:.2f}",
        ]  # fmt: skip
        return "| " + " | ".join(cells) + " |"

    def ratios(self) -> dict[str, list[float]]:
        """Goodput of ``predictive`` (and ``strict``, its key prefixed) ÷ ``static`` per
        (pattern, load), one value per round."""
        found = {(r.round, r.pattern, r.load, r.mode): r.goodput for r in self.runs}
        ratios: dict[str, list[float]] = {}
        for (round_, pattern, load, mode), goodput in found.items():
            static = found.get((round_, pattern, load, "static"))
            if mode in ("predictive", "strict") and static:
                key = f"{'strict ' if mode == 'strict' else ''}{pattern} {load:g}x"
                ratios.setdefault(key, []).append(goodput / static)
        return ratios

    def markdown(self) -> str:
        deadlines = " and ".join(f"{d * 1000:g} ms" for d in self.deadlines)
        capacity = self.capacity.summary_line() if self.capacity else "not measured"
        lines = [*heading(self.command, self.started),
                 f"Setup: {self.setup}, model {self.model}, SLO classes {deadlines} (half each). "
                 f"Capacity (closed loop): {capacity}", "",
                 "| " + " | ".join(TABLE_HEADINGS) + " |", "|---" * len(TABLE_HEADINGS) + "|",
                 *(self.row(run) for run in self.runs)]  # fmt: skip
        if ratios := self.ratios():
            lines += ["", "| goodput predictive (or strict) ÷ static | per round |", "|---|---|"]
            lines += [f"| {key} | {', '.join(f'{v:.2f}' for v in values)} |"
                      for key, values in ratios.items()]  # fmt: skip
        lines += [f"\n> {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, object]:
        return {
            "command": self.command, "started": self.started.isoformat(), "machine": machine(),
            "setup": self.setup, "model": self.model, "deadlines_s": list(self.deadlines),
            "capacity": self.capacity.to_dict() if self.capacity else None,
            "runs": [run.to_dict() for run in self.runs], "goodput_ratios": self.ratios(),
            "notes": self.notes,
        }  # fmt: skip


def goodput_bound(load: float, *, duty: float, period_s: float,
                  longest_deadline_s: float) -> float:
    """Goodput ÷ capacity that no scheduler can beat: a period's requests all arrive in its
    first ``duty``, and none can be answered in time after the last arrival's deadline, so a
    server at capacity does useful work for at most ``duty · period + longest deadline`` of
    each period; and never more than was offered. Uniform arrivals (duty 1): ``min(load, 1)``.
    Bursty ones at duty 0.25 with a period of twice the longest deadline: at most 0.75 (the mlp's
    1 s period and 250 ms deadline: 0.5), whatever the load."""
    busy = min(1.0, duty + longest_deadline_s / period_s) if duty < 1.0 else 1.0
    return min(load, busy)


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"
