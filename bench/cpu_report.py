"""The ``bench.cpu_per_request`` report: µs of CPU per request, per process and system."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from bench.report import heading, machine
from bench.result import Percentiles

HOPS = ("nginx (edge)", "gateway", "router", "batcher", "worker",
        "fused front (gateway+router)", "fused (gateway+router+batcher+worker)",
        "fused core (batcher+worker)",
        "plain server")  # fmt: skip
"""Data-plane processes, in request order (workers are named ``worker <model>/<version>``)."""
STORES = ("postgres", "etcd")
CONTROL_PLANE = ("registry", "control API", "launcher")
GROUPS = ("hop", "store", "control plane", "other")


def group_of(label: str) -> str:
    """Which part of the system a process label belongs to."""
    if label in HOPS or label.startswith("worker"):
        return "hop"
    if label in STORES:
        return "store"
    return "control plane" if label in CONTROL_PLANE else "other"


def _order(label: str) -> tuple[int, int, str]:
    group = group_of(label)
    within = HOPS if group == "hop" else STORES if group == "store" else CONTROL_PLANE
    base = label.split(" ", 1)[0] if label.startswith("worker") else label
    return GROUPS.index(group), within.index(base) if base in within else len(within), label


@dataclass
class SystemRun:
    """One measured run of one system: what the client saw, what every process spent."""

    system: str
    requests: int
    """Requests h2load finished (answered, whatever the status)."""
    succeeded: int
    seconds: float
    client_cpu_s: float
    cpu_s: dict[str, float]
    """CPU seconds during the run, per process label (processes of one label summed)."""
    latency: Percentiles | None = None
    """The client's latency of the answered requests (REST runs; None where not logged)."""

    def us(self, seconds: float) -> float:
        """``seconds`` of CPU as µs per request."""
        return seconds / self.requests * 1e6 if self.requests else float("nan")

    def group_us(self, group: str) -> float:
        return self.us(sum(s for label, s in self.cpu_s.items() if group_of(label) == group))

    @property
    def hops_us(self) -> float:
        return self.group_us("hop")

    @property
    def all_us(self) -> float:
        return self.us(sum(self.cpu_s.values()))

    @property
    def p50_ms(self) -> float | None:
        return None if self.latency is None else self.latency.p50

    @property
    def rps(self) -> float:
        return self.succeeded / self.seconds if self.seconds else float("nan")

    def summary(self) -> str:
        """One line for the progress output."""
        return (f"{self.requests:,} requests ({self.requests - self.succeeded} errors), "
                f"{self.rps:,.0f} req/s; CPU µs/request: hops {self.hops_us:,.0f}, "
                f"all processes {self.all_us:,.0f}, "
                f"h2load {self.us(self.client_cpu_s):,.0f}")  # fmt: skip

    def to_dict(self, plain: SystemRun | None) -> dict[str, object]:
        return {
            "requests": self.requests, "succeeded": self.succeeded, "seconds": self.seconds,
            "rps": self.rps, "client_cpu_s": self.client_cpu_s,
            "client_us_per_request": self.us(self.client_cpu_s), "cpu_s": self.cpu_s,
            "us_per_request": {label: self.us(s) for label, s in self.cpu_s.items()},
            "groups_us_per_request": {group: self.group_us(group) for group in GROUPS},
            "hops_us_per_request": self.hops_us, "all_us_per_request": self.all_us,
            "latency_ms": None if self.latency is None else {
                "p50": self.latency.p50, "p99": self.latency.p99, "p999": self.latency.p999},
            "p50_over_plain": _ratio(self.p50_ms, plain.p50_ms if plain else None),
            "hops_over_plain": _ratio(self.hops_us, plain.hops_us if plain else None),
            "all_over_plain": _ratio(self.all_us, plain.all_us if plain else None),
        }  # fmt: skip


@dataclass
class CpuReport:
    """Every system measured by one ``bench.cpu_per_request`` invocation."""

    command: str
    started: datetime
    requests: int
    concurrency: int
    runs: list[SystemRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def plain(self) -> SystemRun | None:
        return next((run for run in self.runs if run.system == "plain"), None)

    def markdown(self) -> str:
        """The table for docs/PERFORMANCE.md: one row per process, one column per system."""
        lines = [*heading(self.command, self.started),
                 f"mlp, one row per request, {self.requests:,} requests (h2load, HTTP/1.1, "
                 f"c={self.concurrency}, closed loop); CPU µs per request answered.", "",
                 "| process | part | " + " | ".join(r.system for r in self.runs) + " |",
                 "|---|---|" + "--:|" * len(self.runs)]  # fmt: skip
        labels = sorted({label for run in self.runs for label in run.cpu_s}, key=_order)
        for label in labels:
            lines.append(self._row(label, group_of(label), [
                f"{run.us(run.cpu_s[label]):,.0f}" if label in run.cpu_s else "—"
                for run in self.runs]))  # fmt: skip
        plain = self.plain
        plain_hops, plain_all = (plain.hops_us, plain.all_us) if plain else (None, None)
        lines += [
            self._row("**hops**", "", [f"{r.hops_us:,.0f}" for r in self.runs]),
            self._row("**all processes**", "", [f"{r.all_us:,.0f}" for r in self.runs]),
            self._row("hops ÷ plain", "", [_fmt(_ratio(r.hops_us, plain_hops))
                                           for r in self.runs]),  # fmt: skip
            self._row("all ÷ plain", "", [_fmt(_ratio(r.all_us, plain_all))
                                          for r in self.runs]),  # fmt: skip
            self._row("load generator (h2load)", "client",
                      [f"{r.us(r.client_cpu_s):,.0f}" for r in self.runs]),
            self._row("requests (errors)", "",
                      [f"{r.requests:,} ({r.requests - r.succeeded:,})" for r in self.runs]),
            self._row("req/s", "", [f"{r.rps:,.0f}" for r in self.runs]),
            self._row("latency p50 / p99 ms", "client", [
                "—" if r.latency is None else f"{r.latency.p50:.2f} / {r.latency.p99:.2f}"
                for r in self.runs]),
            self._row("p50 ÷ plain", "", [
                _fmt(_ratio(r.p50_ms, plain.p50_ms if plain else None))
                if r.p50_ms is not None else "—" for r in self.runs]),
        ]  # fmt: skip
        lines += [f"\n> {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _row(label: str, part: str, cells: list[str]) -> str:
        return "| " + " | ".join([label, part, *cells]) + " |"

    def to_dict(self) -> dict[str, object]:
        """The JSON document written next to the Markdown."""
        return {
            "command": self.command, "date": self.started.isoformat(timespec="seconds"),
            "machine": machine(), "model": "mlp", "tool": "h2load --h1",
            "requests": self.requests, "concurrency": self.concurrency,
            "runs": {run.system: run.to_dict(self.plain) for run in self.runs},
            "notes": self.notes,
        }  # fmt: skip


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return value / baseline if baseline and value is not None else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
