"""What an online feature lookup adds to the p99 at 1,000 requests/s, warm and cold.

    python -m bench.features [--rate 1000] [--duration 20] [--rounds 1] [--quick]

Issue 19's target: feature lookup adds <= 5 ms p99 at 1,000 requests/s with a warm cache, and
<= 15 ms p99 cold. Starts its own ``infermesh up`` (gateway 8040, registry 8240, control 8140),
registers ``mlpfeat`` (the demo mlp with two of its inputs, ``age`` and ``spend_30d``, fetched
by ``user_id``; ``bench.features_setup``), bulk-loads ``--entities`` users, then offers the
same open loop (h2load, HTTP/1.1, ``--connections`` connections on an even grid) three ways:

- ``baseline``: the caller sends both inputs, so the router looks nothing up;
- ``warm``: ``--hot`` users, fresh values: the router's cache (1 s TTL) answers all but about
  one lookup per user per second;
- ``cold``: ``--hot`` users whose values are older than ``max_age_s`` (3600 s): the cache may
  not serve them, so every lookup queries Postgres (batched per loop turn) and answers
  ``defaulted_stale``. Distinct fresh ids per request would do the same, but h2load sends one
  body per process; stale values force the refetch with the same few bodies.

The entity id lives in the body's ``parameters``, so each of ``--hot`` h2load processes sends
one user's body at ``rate / hot`` (``bench.mesh.open_loop``); the baseline runs the same
number of processes. Per mode: p50/p99/p99.9 of the 2xx answers after ``--warmup`` seconds,
the achieved rate, h2load's CPU, and "added p99" = p99(mode) − p99(baseline) of the same round.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench import features_setup as setup
from bench.mesh import Mesh, open_loop, sigterm_unwinds, start_mesh
from bench.open_tails import summarise
from bench.report import heading, machine, write_report
from bench.result import Percentiles

MODES = ("baseline", "warm", "cold")
TARGETS_MS = {"warm": 5.0, "cold": 15.0}
"""Issue 19: the most a lookup may add to the p99."""
SATURATED = 0.9
"""An achieved rate under this share of the target: the mesh is saturated, the p99 is queueing."""


@dataclass(frozen=True)
class ModeRun:
    """One open loop of one mode."""

    mode: str
    round: int
    target_rps: float
    achieved_rps: float
    requests: int
    non_2xx: int
    latency: Percentiles
    client_cpu_percent: float
    statuses: dict[str, str]
    """What one request of this mode was answered with, per feature (empty: no lookup)."""


@dataclass
class FeaturesReport:
    command: str
    started: datetime
    hot: int
    entities: int
    bulk_rows_per_s: float = 0.0
    runs: list[ModeRun] = field(default_factory=list)

    def added_p99(self, run: ModeRun) -> float | None:
        """p99(run) − p99(baseline of the same round)."""
        base = next((r for r in self.runs if r.mode == "baseline" and r.round == run.round),
                    None)  # fmt: skip
        return None if base is None or run.mode == "baseline" else (
            run.latency.p99 - base.latency.p99)

    def row(self, run: ModeRun) -> str:
        added = self.added_p99(run)
        target = TARGETS_MS.get(run.mode)
        verdict = "" if added is None or target is None else (
            " (ok)" if added <= target else f" (over {target:g})")
        cells = [str(run.round), run.mode, f"{run.target_rps:,.0f}", f"{run.achieved_rps:,.0f}",
                 f"{run.latency.p50:.2f}", f"{run.latency.p99:.2f}",
                 f"{run.latency.p999 or float('nan'):.2f}",
                 "—" if added is None else f"{added:+.2f}{verdict}",
                 f"{run.client_cpu_percent:.0f}", f"{run.non_2xx}",
                 ", ".join(sorted(set(run.statuses.values()))) or "none"]  # fmt: skip
        return "| " + " | ".join(cells) + " |"

    def markdown(self) -> str:
        headings = ["round", "mode", "target req/s", "achieved req/s", "p50 ms", "p99 ms",
                    "p99.9 ms", "added p99 ms", "h2load CPU %", "non-2xx", "feature status"]
        notes = [f"{self.hot} users per mode (one h2load process each); {self.entities:,} "
                 f"users bulk-loaded at {self.bulk_rows_per_s:,.0f} rows/s.", ""]
        if any(r.achieved_rps < SATURATED * r.target_rps for r in self.runs):
            notes[-1:] = ["**The mesh did not keep up with the offered rate** (achieved < "
                          f"{SATURATED:.0%} of target): those p99s measure queueing, not the "
                          "lookup. Measure on a quiet machine or at a lower `--rate`.", ""]
        return "\n".join([*heading(self.command, self.started), *notes,
                          "| " + " | ".join(headings) + " |", "|" + "---|" * len(headings),
                          *(self.row(run) for run in self.runs)])  # fmt: skip

    def to_dict(self) -> dict[str, object]:
        runs = [{**asdict(r), "p50_ms": r.latency.p50, "p99_ms": r.latency.p99,
                 "added_p99_ms": self.added_p99(r)} for r in self.runs]  # fmt: skip
        return {"command": self.command, "started": self.started.isoformat(),
                "machine": machine(), "hot": self.hot, "entities": self.entities,
                "bulk_rows_per_s": self.bulk_rows_per_s, "targets_ms": TARGETS_MS,
                "runs": runs}  # fmt: skip


def prepare(mesh: Mesh, args: argparse.Namespace, report: FeaturesReport) -> dict[str, list[bytes]]:
    """Register the model, load the users; each mode's bodies."""
    with tempfile.TemporaryDirectory(prefix="infermesh-features-") as tmp:
        setup.register(mesh, setup.build_artifact(Path(tmp) / "mlpfeat.pt"))
    now = time.time()
    fresh = [f"u{i}" for i in range(args.entities)]
    report.bulk_rows_per_s = setup.load_entities(mesh, fresh, event_time=now)
    stale = [f"old{i}" for i in range(args.hot)]
    setup.load_entities(mesh, stale, event_time=now - 2 * setup.MAX_AGE_S)
    hot = fresh[:: max(1, len(fresh) // args.hot)][: args.hot]
    return {"baseline": [setup.body(u, given=True) for u in hot],
            "warm": [setup.body(u) for u in hot], "cold": [setup.body(u) for u in stale]}


def run_mode(mesh: Mesh, mode: str, bodies: list[bytes], args: argparse.Namespace, *,
             round_: int, logs: Path) -> ModeRun:  # fmt: skip
    """One open loop of ``mode`` at ``--rate``."""
    seen = setup.statuses(mesh, bodies[0])
    url = mesh.gateway + f"/v2/models/{setup.MODEL}/infer"
    seconds = args.duration + args.warmup
    run = open_loop(url, bodies, rate=args.rate, connections=args.connections, seconds=seconds,
                    logs=logs, name=f"h2load-r{round_}-{mode}")  # fmt: skip
    latency, achieved, non_2xx, requests = summarise(run.responses, args.warmup)
    window = max(r.start_s for r in run.responses) - min(r.start_s for r in run.responses)
    cpu = 100 * run.client_cpu_s / window if window > 0 else float("nan")
    return ModeRun(mode, round_, args.rate, achieved, requests, non_2xx + run.unanswered,
                   latency, cpu, seen)  # fmt: skip


def measure(mesh: Mesh, args: argparse.Namespace, report: FeaturesReport, logs: Path) -> None:
    """Prepare, then every round: baseline, warm, cold."""
    bodies = prepare(mesh, args, report)
    for round_ in range(args.rounds):
        for mode in MODES:
            run = run_mode(mesh, mode, bodies[mode], args, round_=round_, logs=logs)
            report.runs.append(run)
            print(report.row(run), flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--rate", type=float, default=1000.0, help="offered req/s")
    add("--duration", type=float, default=20.0, help="measured seconds per mode")
    add("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of each")
    add("--rounds", type=int, default=1)
    add("--connections", type=int, default=32, help="in all, split over the h2load processes")
    add("--hot", type=int, default=8, help="users per mode (h2load processes)")
    add("--entities", type=int, default=10_000, help="users bulk-loaded")
    add("--quick", action="store_true", help="smoke run: 200 req/s, 2 s, 2 users, 100 loaded")
    add("--ports", type=int, nargs=2, default=(8040, 8240), metavar=("GATEWAY", "REGISTRY"))
    add("--out", type=Path, help="JSON path (default bench/results/features-DATE.json)")
    add("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    add("--ready-timeout", type=float, default=180.0)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.rate, args.duration, args.warmup, args.hot, args.entities = 200.0, 2.0, 0.5, 2, 100
        args.connections = 4
    for name in ("rate", "duration", "rounds", "connections", "hot", "entities"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    if args.hot > min(args.entities, args.connections):
        parser.error("--hot must be at most --entities and --connections")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = datetime.now(UTC)
    command = shlex.join(["python", "-m", "bench.features", *argv])
    report = FeaturesReport(command, started, hot=args.hot, entities=args.entities)
    out = args.out or Path("bench/results") / f"features-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    with sigterm_unwinds(), ExitStack() as stack:
        measure(start_mesh(stack, args, logs, tuple(args.ports)), args, report, logs)
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
