"""The ``run_all`` report: ratios between setups, and a Markdown table for docs/PERFORMANCE.md."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench.result import LoadResult

OPEN_LOAD_FRACTION = 0.8
"""Open-loop runs offer this fraction of the closed-loop maximum rate."""


@dataclass(frozen=True)
class Run:
    """One load run of one setup (``plain``, ``mesh`` or ``fused``)."""

    setup: str
    result: LoadResult


@dataclass
class Report:
    """Everything one ``run_all`` invocation measured."""

    command: str
    started: datetime
    inprocess_rows_per_s: dict[str, float] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(self, setup: str, model: str, mode: str) -> LoadResult | None:
        """Return the first run of ``setup`` for ``model`` in ``mode``, if there was one."""
        for run in self.runs:
            if (run.setup, run.result.model, run.result.mode) == (setup, model, mode):
                return run.result
        return None

    def ratios(self) -> dict[str, float | None]:
        """Return the headline ratios; a ratio whose runs are missing is ``None``."""
        plain = self.find("plain", "mlp", "closed")
        encoder_mesh = self.find("mesh", "encoder", "closed")
        encoder_ceiling = self.inprocess_rows_per_s.get("encoder")
        ratios: dict[str, float | None] = {
            "mesh_over_plain_mlp": _ratio(self.find("mesh", "mlp", "closed"), plain),
            "fused_over_plain_mlp": _ratio(self.find("fused", "mlp", "closed"), plain),
            "encoder_mesh_over_inprocess_b32": (
                encoder_mesh.rows_per_s / encoder_ceiling
                if encoder_mesh and encoder_ceiling
                else None
            ),
        }
        for setup in ("mesh", "fused"):
            open_run = self.find(setup, "mlp", "open")
            ratios[f"{setup}_p99_over_p50_at_80pct"] = (
                open_run.latency.p99 / open_run.latency.p50 if open_run else None
            )
        return ratios

    def to_dict(self) -> dict[str, object]:
        """Return the JSON document written next to the Markdown."""
        return {
            "command": self.command,
            "date": self.started.isoformat(timespec="seconds"),
            "machine": machine(),
            "inprocess_batch32_rows_per_s": self.inprocess_rows_per_s,
            "runs": [{"setup": run.setup, **run.result.to_dict()} for run in self.runs],
            "ratios": self.ratios(),
            "notes": self.notes,
        }

    def markdown(self) -> str:
        """Return the Markdown section to paste into docs/PERFORMANCE.md."""
        info = machine()
        lines = [
            f"### Benchmark {self.started:%Y-%m-%d %H:%M %Z}",
            "",
            f"- command: `{self.command}`",
            f"- machine: {info['cpu']}, {info['cpus']} CPUs, {info['platform']}, "
            f"Python {info['python']}, 1-min load average {info['load_average_1m']} at the end "
            "(other processes on the machine compete for the same cores)",
            "- closed loop: concurrency 64, one row per request; open loop: Poisson arrivals at "
            f"{OPEN_LOAD_FRACTION:.0%} of the closed-loop req/s (bench.loadgen)",
            "",
            "| setup | model | load | tool | req/s | rows/s | p50 ms | p99 ms | p99.9 ms "
            "| errors | client send lag p99 ms |",
            "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for model, rows_per_s in self.inprocess_rows_per_s.items():
            lines.append(f"| in-process | {model} | batch 32, tight loop | — | — "
                         f"| {rows_per_s:,.0f} | — | — | — | — | — |")  # fmt: skip
        lines += [_row(run) for run in self.runs]
        lines += ["", "| ratio | value |", "|---|--:|"]
        lines += [f"| {name} | {_fmt(value, '.2f')} |" for name, value in self.ratios().items()]
        lines += [f"\n> {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _row(run: Run) -> str:
    result = run.result
    load = (
        f"closed c={result.concurrency}"
        if result.offered_rate is None
        else f"open {result.offered_rate:,.0f}/s"
    )
    lag = _fmt(result.send_lag.p99 if result.send_lag else None, ".2f")
    latency = result.latency
    return (
        f"| {run.setup} | {result.model} | {load} | {result.tool} | {result.rps:,.0f} "
        f"| {result.rows_per_s:,.0f} | {latency.p50:.2f} | {latency.p99:.2f} "
        f"| {_fmt(latency.p999, '.2f')} | {result.errors} / {result.requests} | {lag} |"
    )


def _ratio(numerator: LoadResult | None, denominator: LoadResult | None) -> float | None:
    if numerator is None or denominator is None or not denominator.rps:
        return None
    return numerator.rps / denominator.rps


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def machine() -> dict[str, object]:
    """Describe the machine: CPU model, CPU count, OS and Python version."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "cpu": cpu,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
    }
