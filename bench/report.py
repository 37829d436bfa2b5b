"""The ``run_all`` report: ratios between setups, and a Markdown table for docs/PERFORMANCE.md."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import orjson

from bench.result import LoadResult

OPEN_LOAD_FRACTION = 0.8
"""Open-loop runs offer this fraction of the closed-loop maximum rate."""


@dataclass(frozen=True)
class Run:
    """One load run of one setup (``plain``, ``mesh`` or ``fused``)."""

    setup: str
    result: LoadResult
    round: int = 0


@dataclass
class Report:
    """Everything one ``run_all`` invocation measured."""

    command: str
    started: datetime
    inprocess_rows_per_s: dict[str, list[float]] = field(default_factory=dict)
    """Per model, one figure per round."""
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(
        self, setup: str, model: str, mode: str, round_: int | None = None
    ) -> LoadResult | None:
        """The first run of ``setup`` for ``model`` in ``mode`` (in ``round_`` if given)."""
        for run in self.runs:
            if (run.setup, run.result.model, run.result.mode) == (setup, model, mode) and (
                round_ is None or run.round == round_
            ):
                return run.result
        return None

    def _per_round(self, numerator: str, denominator: str, model: str) -> list[float]:
        """Ratio of two setups' closed-loop rows/s, one value per round that has both."""
        values = []
        for round_ in sorted({run.round for run in self.runs}):
            top = self.find(numerator, model, "closed", round_)
            if denominator == "in-process":
                ceiling = self.inprocess_rows_per_s.get(model, [])
                bottom = ceiling[round_] if round_ < len(ceiling) else None
            else:
                found = self.find(denominator, model, "closed", round_)
                bottom = found.rows_per_s if found else None
            if top is not None and bottom:
                values.append(top.rows_per_s / bottom)
        return values

    def ratio_ranges(self) -> dict[str, list[float]]:
        """Every headline ratio, one value per round (open-loop ones: a single run)."""
        ranges = {
            "mesh_over_plain_mlp": self._per_round("mesh", "plain", "mlp"),
            "fused_over_plain_mlp": self._per_round("fused", "plain", "mlp"),
            "encoder_mesh_over_inprocess_b32": self._per_round("mesh", "in-process", "encoder"),
            "encoder_fused_over_inprocess_b32": self._per_round(
                "fused", "in-process", "encoder"
            ),
        }
        for setup in ("mesh", "fused"):
            open_run = self.find(setup, "mlp", "open")
            ranges[f"{setup}_p99_over_p50_at_80pct"] = (
                [open_run.latency.p99 / open_run.latency.p50] if open_run else []
            )
        return ranges

    def ratios(self) -> dict[str, float | None]:
        """The headline ratios as medians over rounds; ``None`` where runs are missing."""
        return {
            name: statistics.median(values) if values else None
            for name, values in self.ratio_ranges().items()
        }

    def to_dict(self) -> dict[str, object]:
        """Return the JSON document written next to the Markdown."""
        return {
            "command": self.command,
            "date": self.started.isoformat(timespec="seconds"),
            "machine": machine(),
            "inprocess_batch32_rows_per_s": self.inprocess_rows_per_s,
            "runs": [
                {"setup": run.setup, "round": run.round, **run.result.to_dict()}
                for run in self.runs
            ],
            "ratios": self.ratios(),
            "ratios_per_round": self.ratio_ranges(),
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
            f"{OPEN_LOAD_FRACTION:.0%} of the rate the same Python client (bench.loadgen) "
            "reaches in a closed loop just before (the last round's loadgen rows)",
            "",
            "- rounds: every setup runs once per round, interleaved, all servers up throughout, "
            "so slow spells of the shared machine hit every setup alike; ratios are per round",
            "",
            "| round | setup | model | load | tool | req/s | rows/s | p50 ms | p99 ms | p99.9 ms "
            "| errors | client send lag p99 ms |",
            "|--:|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for model, per_round in self.inprocess_rows_per_s.items():
            for round_, rows_per_s in enumerate(per_round):
                lines.append(f"| {round_} | in-process | {model} | batch 32, tight loop | — | — "
                             f"| {rows_per_s:,.0f} | — | — | — | — | — |")  # fmt: skip
        lines += [_row(run) for run in self.runs]
        lines += ["", "| ratio | median | per round |", "|---|--:|---|"]
        ranges = self.ratio_ranges()
        for name, value in self.ratios().items():
            spread = ", ".join(f"{v:.2f}" for v in ranges[name]) or "n/a"
            lines.append(f"| {name} | {_fmt(value, '.2f')} | {spread} |")
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
        f"| {run.round} | {run.setup} | {result.model} | {load} | {result.tool} "
        f"| {result.rps:,.0f} "
        f"| {result.rows_per_s:,.0f} | {latency.p50:.2f} | {latency.p99:.2f} "
        f"| {_fmt(latency.p999, '.2f')} | {result.errors} / {result.requests} | {lag} |"
    )


class Writable(Protocol):
    """A report that renders as Markdown and as a JSON-able dict."""

    def markdown(self) -> str: ...

    def to_dict(self) -> dict[str, object]: ...


def write_report(report: Writable, out: Path, logs: Path) -> None:
    """Print the Markdown and write it next to the JSON at `out`."""
    markdown = report.markdown()
    print("\n" + markdown)
    out.write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')} (server logs in {logs})")


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


def heading(command: str, started: datetime) -> list[str]:
    """The lines every bench report opens with: the command, the date, the machine."""
    return [f"Command: `{command}`  ", f"Date: {started:%Y-%m-%d %H:%M} UTC  ",
            f"Machine: {machine()}", ""]


@dataclass
class RatioReport:
    """Closed loops of several setups taking turns per round, read as req/s ratios to the
    `baseline` setup's run of the same round (`bench.rollouts`, `bench.tracing`)."""

    command: str
    started: datetime
    baseline: str
    label: str
    """The first column's heading: what the setups vary."""
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)

    def ratios(self, setup: str) -> list[float]:
        return [r.rps / s.rps for r, s in zip(self.runs[setup], self.runs[self.baseline],
                                              strict=False) if s.rps]

    def extra_headings(self) -> list[str]:
        """More columns, after the ratios (none here)."""
        return []

    def extra_cells(self, setup: str) -> list[str]:
        return []

    def markdown(self) -> str:
        headings = [self.label, "req/s (median)", "p50 ms", "p99 ms",
                    f"÷ {self.baseline}, per round", *self.extra_headings()]
        lines = [*heading(self.command, self.started), "| " + " | ".join(headings) + " |",
                 "|" + "---|" * len(headings)]
        for setup, results in self.runs.items():
            best = sorted(results, key=lambda r: r.rps)[len(results) // 2]
            ratios = "—" if setup == self.baseline else ", ".join(
                f"{x:.2f}" for x in self.ratios(setup)
            )
            cells = [setup, f"{best.rps:,.0f}", f"{best.latency.p50:.2f}",
                     f"{best.latency.p99:.2f}", ratios, *self.extra_cells(setup)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"command": self.command, "started": self.started.isoformat(),
                "machine": machine(),
                "runs": {k: [r.to_dict() for r in v] for k, v in self.runs.items()},
                "ratios": {k: self.ratios(k) for k in self.runs if k != self.baseline}}

    def median_ratios(self) -> dict[str, float]:
        return {k: round(statistics.median(self.ratios(k)), 2)
                for k in self.runs if k != self.baseline}
