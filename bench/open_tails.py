"""Open-loop tail latency with a C client (h2load): p50/p99/p99.9 at fractions of the maximum.

    python -m bench.open_tails [--systems plain,fused,fused2,fused3,replicas2,mesh]
                               [--fractions 0.5,0.8] [--duration 10] [--connections 64]

Run on a quiet machine (nothing else busy), e.g. for issue 16's target "open loop at 80 % of the
maximum, p99 <= 3 x p50":

    .venv/bin/python -m bench.open_tails --systems plain,fused,fused2,fused3,replicas2,mesh \\
        --fractions 0.5,0.8 --duration 20 --connections 64

Each system runs alone, started as ``bench.cpu_per_request`` starts it, and is stopped before
the next one. Its maximum is what a short closed loop reaches (h2load, ``--max-concurrency``
connections, ``--max-requests`` requests, after ``--warmup-requests``). Then, for each
fraction, h2load offers that share of the maximum as an open loop: ``--connections`` HTTP/1.1
connections, each sending at a fixed rate (``--rps``, which h2load applies per connection),
started a few at a time (``-r``/``--rate-period``) over one sending period so that their
phases, and so the arrivals, are spread evenly (``-r`` rules out ``-D``, so each connection
sends a count: its rate times the run's seconds). The Python open-loop client cost more CPU than
the servers at these rates; h2load's own CPU (its rusage) is recorded to show it does not.

Latency comes from h2load's ``--log-file`` (one line per request), percentiles over the 2xx
answers sent after ``--warmup`` seconds; the achieved rate counts every request sent in that
window. HTTP/1.1 carries one request at a time, so a connection whose previous answer is still
out sends late, and h2load times the late request from when it went out: keep each
connection's rate well below 1 / p99 (many connections) or the tail reads better than it is.
The CPU of the system's processes over the open run is read from ``/proc`` (``bench.proc_cpu``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import proc_cpu
from bench.cpu_per_request import MODEL, SYSTEMS, run_h2load, start_system
from bench.credentials import auth_headers
from bench.h2load import H2LOAD, Arrivals, Response, parse_log, run_together, started_requests
from bench.models import DEFAULT_CACHE_DIR
from bench.payloads import infer_path, request_body
from bench.report import heading, machine, write_report
from bench.result import Percentiles

MIN_IDLE_S = 10
"""h2load gives up a connection silent this long (a hung server ends the run, not the bench)."""


@dataclass(frozen=True)
class TailRun:
    """One open-loop run of one system at one fraction of its maximum."""

    system: str
    fraction: float
    maximum_rps: float
    target_rps: float
    """The rate the schedule offers (the asked share of the maximum, to whole ms periods)."""
    connections: int
    requests: int
    """Requests sent inside the measured window."""
    achieved_rps: float
    non_2xx: int
    """Answers outside 2xx and failed streams, inside the measured window."""
    unanswered: int
    """Requests h2load started but got no answer to before the run ended."""
    latency: Percentiles
    client_cpu_s: float
    wall_s: float
    system_cpu_s: dict[str, float]

    @property
    def p99_over_p50(self) -> float:
        return self.latency.p99 / self.latency.p50 if self.latency.p50 > 0 else float("nan")

    @property
    def client_cpu_percent(self) -> float:
        """h2load's CPU over its run, in % of one core."""
        return 100 * self.client_cpu_s / self.wall_s

    @property
    def system_cpu_percent(self) -> float:
        """Every process of the system over the run, in % of one core."""
        return 100 * sum(self.system_cpu_s.values()) / self.wall_s

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.update(p50_ms=self.latency.p50, p99_ms=self.latency.p99,
                    p999_ms=self.latency.p999, p99_over_p50=self.p99_over_p50,
                    client_cpu_percent=self.client_cpu_percent,
                    system_cpu_percent=self.system_cpu_percent)  # fmt: skip
        return data

    def row(self) -> str:
        cells = [self.system, f"{self.fraction:.2f}", f"{self.target_rps:,.0f}",
                 f"{self.achieved_rps:,.0f}", f"{self.latency.p50:.2f}",
                 f"{self.latency.p99:.2f}", f"{self.latency.p999 or float('nan'):.2f}",
                 f"{self.p99_over_p50:.2f}", f"{self.client_cpu_percent:.0f}",
                 f"{self.system_cpu_percent:.0f}", f"{self.non_2xx + self.unanswered}"]  # fmt: skip
        return "| " + " | ".join(cells) + " |"


@dataclass
class TailsReport:
    """Every run of one invocation, with the command and machine that produced it."""

    command: str
    started: datetime
    maxima: dict[str, float]
    runs: list[TailRun]

    def markdown(self) -> str:
        headings = ["system", "fraction", "target req/s", "achieved req/s", "p50 ms", "p99 ms",
                    "p99.9 ms", "p99 ÷ p50", "client CPU %", "system CPU %", "non-2xx"]
        lines = [*heading(self.command, self.started), "| " + " | ".join(headings) + " |",
                 "|" + "---|" * len(headings), *(run.row() for run in self.runs)]  # fmt: skip
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"command": self.command, "started": self.started.isoformat(),
                "machine": machine(), "maxima_rps": self.maxima,
                "runs": [run.to_dict() for run in self.runs]}  # fmt: skip


def plan(target_rps: float, *, connections: int, seconds: float) -> Arrivals:
    """``connections`` clients (about) sending ``target_rps`` in all for ``seconds``, started
    over one sending period so that their phases are spread evenly."""
    if target_rps <= 0:
        raise ValueError(f"target rate must be positive, got {target_rps}")
    period_ms = max(1, round(connections / target_rps * 1000))
    return Arrivals.plan(target_rps, period_ms=period_ms, duty=1.0, seconds=seconds)


def open_command(url: str, arrivals: Arrivals, body: Path, log: Path) -> list[str]:
    """h2load, one thread, HTTP/1.1: each client sends once per ``arrivals.period_ms``."""
    per_client_rps = 1000 / arrivals.period_ms
    idle_s = max(MIN_IDLE_S, round(3 / per_client_rps))
    command = [H2LOAD, "--h1", "-t", "1", "-c", str(arrivals.clients),
               "-n", str(arrivals.clients * arrivals.cycles), "-r", str(arrivals.per_tick),
               "--rate-period", f"{arrivals.tick_ms}ms", "--rps", f"{per_client_rps:.6g}",
               "-d", str(body), "-N", f"{idle_s}s", "--log-file", str(log),
               "-H", "content-type: application/json"]  # fmt: skip
    for name, value in auth_headers(url).items():
        command += ["-H", f"{name}: {value}"]
    return [*command, url.rstrip("/") + infer_path(MODEL)]


def summarise(responses: list[Response], warmup_s: float) -> tuple[Percentiles, float, int, int]:
    """(latency of the 2xx answers, achieved req/s, non-2xx count, requests) over the requests
    sent from ``warmup_s`` after the first one to the last one."""
    if not responses:
        raise RuntimeError("h2load logged no request")
    first = min(r.start_s for r in responses)
    measured = [r for r in responses if r.start_s >= first + warmup_s]
    if len(measured) < 2:
        raise RuntimeError(f"fewer than 2 requests sent after the {warmup_s} s warm-up")
    window = max(r.start_s for r in measured) - min(r.start_s for r in measured)
    ok = [r.latency_s for r in measured if 200 <= r.status < 300]
    achieved = (len(measured) - 1) / window if window > 0 else float("nan")
    return Percentiles.of(ok), achieved, len(measured) - len(ok), len(measured)


def run_open(
    system: str, url: str, args: argparse.Namespace, *, fraction: float, maximum: float,
    roots: set[int],
) -> TailRun:
    """One open-loop run at ``fraction`` of ``maximum``, with the system's CPU around it."""
    arrivals = plan(fraction * maximum, connections=args.connections,
                    seconds=args.duration + args.warmup)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="infermesh-open-") as tmp:
        body, log, output = Path(tmp) / "body.json", Path(tmp) / "log.tsv", Path(tmp) / "out"
        body.write_bytes(request_body(MODEL, 1))
        command = open_command(url, arrivals, body, log)
        before, began = proc_cpu.tree_cpu(roots), time.monotonic()
        client_cpu_s = run_together([command], [output], args.duration + args.warmup + 120)
        wall_s, after = time.monotonic() - began, proc_cpu.tree_cpu(roots)
        responses = parse_log(log.read_text())
        unanswered = started_requests(output.read_text()) - len(responses)
    latency, achieved, non_2xx, requests = summarise(responses, args.warmup)
    system_cpu_s: dict[str, float] = {}
    for key, seconds in after.items():
        label = proc_cpu.label_of(key.pid)
        system_cpu_s[label] = system_cpu_s.get(label, 0.0) + seconds - before.get(key, 0.0)
    return TailRun(system, fraction, maximum, arrivals.rate, arrivals.clients, requests,
                   achieved, non_2xx, unanswered, latency, client_cpu_s, wall_s,
                   system_cpu_s)  # fmt: skip


def measure(system: str, args: argparse.Namespace, logs: Path) -> tuple[float, list[TailRun]]:
    """Start ``system`` alone, find its maximum, run every fraction, stop it."""
    seen: set[proc_cpu.ProcessKey] = set()
    with ExitStack() as stack:
        stack.callback(proc_cpu.kill_leftovers, seen)  # runs last: after the system's own stop
        before_start = proc_cpu.children_of(os.getpid())
        url = start_system(stack, system, args, logs)
        roots = proc_cpu.with_postmasters(proc_cpu.children_of(os.getpid()) - before_start)
        seen.update(proc_cpu.tree_cpu(roots))
        if args.warmup_requests:
            run_h2load(url, requests=args.warmup_requests, concurrency=args.max_concurrency,
                       timeout=args.run_timeout)  # fmt: skip
        closed = run_h2load(url, requests=args.max_requests, concurrency=args.max_concurrency,
                            timeout=args.run_timeout)  # fmt: skip
        maximum = closed.succeeded / closed.seconds
        print(f"{system}: maximum {maximum:,.0f} req/s (closed loop)", flush=True)
        runs = []
        for fraction in args.fractions:
            runs.append(run := run_open(system, url, args, fraction=fraction, maximum=maximum,
                                        roots=roots))  # fmt: skip
            print(run.row(), flush=True)
        seen.update(proc_cpu.tree_cpu(roots))
    return maximum, runs


def _fractions(text: str) -> list[float]:
    try:
        fractions = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not fractions or any(not 0 < f <= 2 for f in fractions):
        raise argparse.ArgumentTypeError(f"each fraction must be in (0, 2], got {text!r}")
    return fractions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.open_tails", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--systems", default=",".join(SYSTEMS),
        help="comma-separated, in order, from: " + ", ".join(SYSTEMS))
    add("--fractions", type=_fractions, default=[0.5, 0.8], help="of the maximum, e.g. 0.5,0.8")
    add("--duration", type=float, default=10.0, help="measured seconds per open run")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds at the start of each")
    add("--connections", type=int, default=64, help="open-loop connections")
    add("--max-requests", type=int, default=10_000, help="closed loop that finds the maximum")
    add("--max-concurrency", type=int, default=64, help="its connections")
    add("--warmup-requests", type=int, default=2_000, help="unmeasured, before it")
    add("--out", type=Path, help="JSON path (default bench/results/open-tails-DATE.json)")
    add("--run-timeout", type=float, default=600.0, help="seconds per closed h2load run")
    add("--plain-port", type=int, default=8500)
    add("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    add("--ready-timeout", type=float, default=180.0, help="seconds")
    add("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    add("--artifact-dir", type=Path, help="DIR/mlp.pt for the plain server")
    return parser


def _checked(args: argparse.Namespace) -> list[str]:
    systems = [s for s in args.systems.split(",") if s]
    if not systems or set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: choose from {', '.join(SYSTEMS)}, got {args.systems!r}")
    for name in ("duration", "connections", "max_requests", "max_concurrency"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        raise SystemExit("--warmup must not be negative")
    for name in ("max_requests", "warmup_requests"):
        value = getattr(args, name)
        if value and value < args.max_concurrency:  # h2load refuses fewer requests than clients
            raise SystemExit(f"--{name.replace('_', '-')} must be at least --max-concurrency")
    return systems


def main(argv: list[str] | None = None) -> int:
    """Measure each system in turn, print the Markdown, write the JSON."""
    args = _parser().parse_args(argv)
    systems = _checked(args)
    started = datetime.now(UTC)
    command = shlex.join(["python", "-m", "bench.open_tails",
                          *(sys.argv[1:] if argv is None else argv)])  # fmt: skip
    report = TailsReport(command, started, maxima={}, runs=[])
    out = args.out or Path("bench/results") / f"open-tails-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so every system started is stopped.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for system in systems:
            report.maxima[system], runs = measure(system, args, logs)
            report.runs += runs
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
