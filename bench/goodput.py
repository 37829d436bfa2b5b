"""Goodput under open-loop load: the SLO scheduler against the static dynamic batcher.

    python -m bench.goodput [--model mlp] [--fused] [--rounds 2] [--duration 20] [--quick]

Starts ``infermesh up`` (or ``--fused``) on its own ports and state dir, auth on, with the demo
models. Measures the model's capacity with a closed loop (wrk, c=64), then offers open-loop
load with h2load at 0.5×, 1×, 1.5× and 2× that capacity in two arrival patterns:

- ``uniform``: an even grid of arrivals at the rate (h2load sends at fixed times; an even grid
  is gentler than Poisson, so this pattern is the easy case; ``bursty`` is the hard one);
- ``bursty``: on/off, all of a period's requests in its first quarter (4× the mean rate),
  then idle; the period is 1 s, or twice the longest deadline if that is longer.

Half the requests carry the tighter SLO, half the looser (mlp: 50 ms and 250 ms; encoder:
1 s and 3 s), as the OIP ``timeout`` parameter; one h2load process per class. Every load runs
once per mode and round: ``predictive`` (the default admission) and ``static``
(``admission: off`` with a fixed ``max_queue_delay_ms``), switched through the registry's
``PATCH /v1/models/{name}/versions/{version}/batching``; the mode that runs first alternates
per round. Without that endpoint only the ``current`` policy runs, and the report says so.
Per run: goodput (200s within their deadline per second), SLO attainment of admitted requests,
refused (503) and 504 shares, late 200s, p50/p99 of admitted requests, h2load's CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import shlex
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.credentials import auth_headers, remember_key
from bench.goodput_report import GoodputReport
from bench.goodput_stats import Measurement, tally, whole_periods, window_of
from bench.h2load import (
    H2LOAD,
    Arrivals,
    Response,
    StreamArrivals,
    parse_log,
    run_together,
    started_requests,
)
from bench.payloads import infer_path, request_body
from bench.report import write_report
from bench.result import LoadResult, Percentiles
from bench.run_all import closed_loop, start_launcher
from cli.batching import inflight_bound
from deploy.worker_counts import FUSED_LAYOUTS

SLO_CLASSES = {"mlp": (0.05, 0.25), "encoder": (1.0, 3.0)}
"""Deadlines (seconds) of the two SLO classes per demo model, mixed half and half."""
LOADS = (0.5, 1.0, 1.5, 2.0)
PATTERNS = {"uniform": 1.0, "bursty": 0.25}
"""Arrival pattern: the share of each period in which its requests arrive."""
SETTLE_S = 1.0
"""Pause after a run and after a policy change: the queues drain, the batchers see the
change (the registry publishes it through an etcd watch, well under a second)."""


def slo_body(model: str, deadline_s: float) -> bytes:
    """One row of ``model``'s demo input with an OIP ``timeout`` parameter (seconds)."""
    body: dict[str, Any] = orjson.loads(request_body(model, 1))
    return orjson.dumps({**body, "parameters": {"timeout": deadline_s}})


def unlimited_tenant(control: str, token: str) -> str:
    """Create tenant ``goodput`` with quotas that never bind, so that the batcher alone decides
    what is refused (the demo tenant's 512 concurrent requests would bind); return its key."""
    auth = {"Authorization": f"Bearer {token}"}
    quota = {"rate": 1_000_000, "burst": 1_000_000, "max_concurrency": 1_000_000}
    _call(control, "POST", "/v1/tenants", {"name": "goodput", **quota}, auth)
    return str(_call(control, "POST", "/v1/tenants/goodput/keys", {}, auth)["key"])


MODES = ("predictive", "strict", "static")
_KEEP: Any = object()
"""`--edge-inflight` not given: the bound stays as registered."""


def mode_policies(registry: str, model: str, static_delay_ms: float) -> dict[str, Any]:
    """Batching change per mode, or ``{"current": None}`` if the registry has no PATCH."""
    version, batching = _latest(registry, model)
    predictive = {"admission": "predictive", "max_queue_delay_ms": batching["max_queue_delay_ms"]}
    if _call(registry, "PATCH", _batching_path(model, version), predictive) is None:
        return {"current": None}
    static = {"admission": "off", "max_queue_delay_ms": static_delay_ms}
    return {"predictive": predictive, "strict": {**predictive, "admission": "strict"},
            "static": static}


def apply_mode(registry: str, model: str, change: dict[str, Any] | None) -> None:
    """PATCH the latest version's batching (``None``: leave the policy as it is)."""
    if change is None:
        return
    version, _ = _latest(registry, model)
    if _call(registry, "PATCH", _batching_path(model, version), change) is None:
        raise RuntimeError(f"PATCH batching of {model} {version}: not found")
    time.sleep(SETTLE_S)


def _latest(registry: str, model: str) -> tuple[str, dict[str, Any]]:
    detail = _call(registry, "GET", f"/v1/models/{model}")
    if detail is None:
        raise RuntimeError(f"registry {registry} does not know model {model}")
    latest = detail["versions"][-1]
    return str(latest["version"]), dict(latest["batching"])


def _batching_path(model: str, version: str) -> str:
    return f"/v1/models/{model}/versions/{version}/batching"


def _call(
    base: str, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
) -> Any:
    """A JSON call to the registry or the control API; ``None`` on 404/405 (unknown path,
    model or method)."""
    request = urllib.request.Request(
        base + path, method=method, data=None if body is None else orjson.dumps(body),
        headers={"Content-Type": "application/json", **auth_headers(base), **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10.0) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):
            return None
        raise RuntimeError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None


@dataclass(frozen=True)
class Target:
    """Where the load goes and where its files land."""

    gateway: str
    registry: str
    tmp: Path
    """h2load's scripts, bodies and per-request logs (large; removed after)."""
    logs: Path
    """h2load's own summaries, kept with the report."""
    edge: str = ""
    """The nginx edge's h2c base URL, with ``--client h2`` (the load goes there)."""

    @property
    def load_url(self) -> str:
        """Where the open-loop load goes: the edge over HTTP/2, else the gateway directly."""
        return self.edge or self.gateway


def period_of(deadlines: tuple[float, ...]) -> int:
    """Milliseconds of one arrival period: 1 s, or twice the longest deadline if longer."""
    return max(1000, round(2000 * max(deadlines)))


def open_run(
    target: Target, rate: float, pattern: str, args: argparse.Namespace, name: str
) -> tuple[dict[float, list[Response]], float, int]:
    """Both SLO classes at ``rate / 2`` each, together: their logs, h2load's CPU seconds and
    how many requests got no answer at all (h2load gave up on their connection)."""
    deadlines = SLO_CLASSES[args.model]
    period_ms = period_of(deadlines)
    warmup, duration = run_span(args)
    url = target.load_url + infer_path(args.model)
    auth = [f"{name}: {value}" for name, value in auth_headers(target.gateway).items()]
    headers = ["Content-Type: application/json", *auth]
    commands, summaries, logs = [], [], {}
    for deadline in deadlines:
        schedule = StreamArrivals if target.edge else Arrivals
        arrivals = schedule.plan(
            rate / len(deadlines), period_ms=period_ms, duty=PATTERNS[pattern],
            seconds=warmup + duration,
        )  # fmt: skip
        stem = target.tmp / f"{name}-{round(deadline * 1000)}ms"
        # Not with_suffix: a load such as 0.5x puts a dot in the name, and with_suffix would
        # cut there (both classes and both modes would share one log file).
        script, body = _beside(stem, ".script"), _beside(stem, ".json")
        script.write_text(arrivals.timing_script(url))
        body.write_bytes(slo_body(args.model, deadline))
        logs[deadline] = _beside(stem, ".tsv")
        idle_s = round(period_ms / 1000 + 4 * max(deadlines) + 5)
        # The deadline in the body (OIP `timeout`) and, with --deadline-header, in
        # X-Request-Timeout too: the gateway can then refuse before reading the body.
        own = [*headers, f"X-Request-Timeout: {deadline:g}"] if args.deadline_header else headers
        commands.append(arrivals.command(script, body, logs[deadline], own, idle_s=idle_s))
        summaries.append(target.logs / f"{stem.name}.out")
    cpu = run_together(commands, summaries, timeout=warmup + duration + 120)
    parsed = {d: parse_log(path.read_text()) for d, path in logs.items()}
    started = sum(started_requests(path.read_text()) for path in summaries)
    return parsed, cpu, started - sum(map(len, parsed.values()))


def run_span(args: argparse.Namespace) -> tuple[float, float]:
    """Seconds of warm-up and of measurement of each open-loop run: ``--warmup`` and
    ``--duration`` stretched to whole arrival periods of the model (`whole_periods`)."""
    return whole_periods(args.warmup, args.duration, period_of(SLO_CLASSES[args.model]) / 1000)


def _beside(stem: Path, extension: str) -> Path:
    """`stem` with `extension` appended (never replacing what follows a dot in its name)."""
    return stem.parent / f"{stem.name}{extension}"


def one_run(
    report: GoodputReport, target: Target, args: argparse.Namespace, *,
    round_: int, pattern: str, load: float, mode: str,
) -> None:
    """One open-loop run at ``load`` × capacity, measured and added to the report."""
    name = f"h2load-r{round_}-{pattern}-{load:g}x-{mode}"
    logs, cpu, unanswered = open_run(target, load * report.capacity_rps, pattern, args, name)
    warmup, duration = run_span(args)
    window = window_of(list(logs.values()), warmup=warmup, duration=duration)
    classes = {deadline: tally(log, deadline, window) for deadline, log in logs.items()}
    run = Measurement(pattern, load, mode, round_, window.seconds, classes, client_cpu_s=cpu,
                      unanswered=unanswered)  # fmt: skip
    report.runs.append(run)
    print(f"[{round_}] {report.line(run)}", flush=True)


def edge_closed_loop(target: Target, args: argparse.Namespace) -> LoadResult:
    """The capacity through the edge: h2load closed loop, 4 connections x 16 streams (c=64,
    as wrk measures the direct path), ``--warmup`` seconds unmeasured first."""
    url = target.edge + infer_path(args.model)
    body = _beside(target.tmp / "capacity", ".json")
    body.write_bytes(request_body(args.model, 1))
    log = _beside(target.tmp / "capacity", ".tsv")
    command = [H2LOAD, "-c", "4", "-m", "16", "-d", str(body),
               "-D", str(round(args.warmup + args.capacity_duration)), "--log-file", str(log),
               "-H", "content-type: application/json",
               *[arg for name, value in auth_headers(target.gateway).items()
                 for arg in ("-H", f"{name}: {value}")], url]  # fmt: skip
    cpu = run_together([command], [target.logs / "h2load-capacity.out"],
                       timeout=args.warmup + args.capacity_duration + 120)  # fmt: skip
    responses = parse_log(log.read_text())
    start = min(r.start_s for r in responses) + args.warmup
    measured = [r for r in responses if r.start_s >= start]
    ok = [r for r in measured if 200 <= r.status < 300]
    seconds = max(r.start_s + r.latency_s for r in measured) - start if measured else 0.0
    return LoadResult(
        "h2load", "closed", args.model, url, seconds, len(measured), len(measured) - len(ok),
        len(ok) / seconds if seconds > 0 else 0.0,
        Percentiles.of([r.latency_s for r in ok] or [0.0]), concurrency=64,
        client_cpu=cpu / max(seconds, 1e-9),
    )


def measure(report: GoodputReport, target: Target, args: argparse.Namespace) -> None:
    """The capacity, then every (round, pattern, load, mode), modes alternating per round."""
    modes = mode_policies(target.registry, args.model, args.static_delay_ms)
    if "current" in modes:
        report.notes.append("the registry has no PATCH .../batching: ran the current policy only")
    else:
        modes = {mode: change for mode, change in modes.items() if mode in args.modes}
    capacity_args = argparse.Namespace(duration=args.capacity_duration, warmup=args.warmup)
    report.capacity = (edge_closed_loop(target, args) if target.edge
                       else closed_loop(target.gateway, args.model, capacity_args))
    print(f"capacity: {report.capacity.summary_line()}", flush=True)
    if args.capacity_rps:
        report.notes.append(f"offered rates scaled by --capacity-rps {args.capacity_rps:g}, "
                            f"not by the {report.capacity.rps:.1f} req/s measured")
        report.capacity = dataclasses.replace(report.capacity, rps=args.capacity_rps)
    if report.capacity_rps <= 0:
        raise RuntimeError("the closed loop served nothing: no capacity to scale the load by")
    for round_ in range(args.rounds):
        order = list(modes.items())[:: 1 if round_ % 2 == 0 else -1]
        for pattern in PATTERNS:
            for load in args.loads:
                for mode, change in order:
                    apply_mode(target.registry, args.model, change)
                    one_run(report, target, args, round_=round_, pattern=pattern, load=load,
                            mode=mode)  # fmt: skip
                    time.sleep(SETTLE_S)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.goodput", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--model", choices=sorted(SLO_CLASSES), default="mlp")
    parser.add_argument("--fused", action="store_true", help="infermesh up --fused")
    parser.add_argument("--processes", type=int, choices=(1, 2, 3), default=1,
                        help="with --fused: 2 runs a core and a front process on one port, 3 two "
                        "fronts and a core that only batches")
    parser.add_argument("--layout", choices=FUSED_LAYOUTS, default="fronts",
                        help="with --fused --processes 2: 'replicas' runs two whole fused "
                        "processes on the port instead, each batching for itself")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=20.0,
                        help="measured s per run, to whole arrival periods (encoder: 6 s)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="unmeasured s per run, up to a whole arrival period")
    parser.add_argument("--capacity-duration", type=float, default=10.0, help="wrk seconds")
    parser.add_argument("--capacity-rps", type=float, default=0.0,
                        help="scale the loads by this rate instead of the measured capacity "
                             "(A/B runs: the closed loop moved 49-92 req/s between starts "
                             "of the same encoder mesh)")  # fmt: skip
    parser.add_argument("--loads", type=float, nargs="+", default=list(LOADS),
                        help="offered rates as multiples of the capacity")  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["predictive", "static"],
                        help="admission modes to run, alternating per round (static: "
                             "admission off with --static-delay-ms)")
    parser.add_argument("--static-delay-ms", type=float, default=5.0,
                        help="max_queue_delay_ms of the static batcher")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~60 s): 1 round, loads 1 and 2, 3 s runs")  # fmt: skip
    parser.add_argument("--ports", type=int, nargs=2, default=(8030, 8230),
                        metavar=("GATEWAY", "REGISTRY"),
                        help="gRPC on GATEWAY+1, control API on REGISTRY-100")  # fmt: skip
    parser.add_argument("--client", choices=("h1", "h2"), default="h1",
                        help="h1: HTTP/1.1 to the gateway, one connection per arrival slot; "
                             "h2: HTTP/2 through the nginx edge (its port: GATEWAY+2), 8 "
                             "connections with many streams each")  # fmt: skip
    parser.add_argument("--deadline-header", action="store_true",
                        help="send each class's deadline as X-Request-Timeout as well as the "
                             "OIP timeout parameter (refusals before the body is read)")
    parser.add_argument("--edge-inflight", type=inflight_bound, default=_KEEP, metavar="N|default",
                        help="the model's bound in flight at the edge (h2), set through the "
                             "registry before measuring (default: as registered; the demo mlp "
                             "64, the encoder the edge's 128)")
    parser.add_argument("--out", type=Path, help="JSON path")
    parser.add_argument("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.quick:
        args.rounds, args.loads, args.duration, args.warmup = 1, [1.0, 2.0], 3.0, 1.0
        args.capacity_duration = 3.0
    started = datetime.now(UTC)
    if args.processes > 1 and not args.fused:
        raise SystemExit(f"--processes {args.processes} goes with --fused")
    if args.layout == "replicas" and not (args.fused and args.processes == 2):
        raise SystemExit("--layout replicas goes with --fused --processes 2")
    setup = ("fused" if args.processes == 1 else f"fused{args.processes}") if args.fused else "mesh"
    setup = "replicas2" if args.layout == "replicas" else setup
    command = shlex.join(["python", "-m", "bench.goodput", *argv])
    deadlines = SLO_CLASSES[args.model]
    report = GoodputReport(command, started, model=args.model, setup=setup, deadlines=deadlines,
                           duties=dict(PATTERNS), period_s=period_of(deadlines) / 1000)
    out = args.out or Path("bench/results") / f"goodput-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    gateway_port, registry_port = args.ports
    token = secrets.token_urlsafe(16)
    with ExitStack() as stack:
        env = {"INFERMESH_CONTROL_ADMIN_TOKENS": f"bench:{token}"}
        if args.client == "h2":
            env |= {"INFERMESH_EDGE": "1", "INFERMESH_EDGE_PORT": str(gateway_port + 2)}
        gateway = start_launcher(stack, args, logs, setup, ports=(gateway_port, registry_port),
                                 extra_env=env)
        remember_key(gateway, unlimited_tenant(f"http://127.0.0.1:{registry_port - 100}", token))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="infermesh-goodput-")))
        edge = f"http://127.0.0.1:{gateway_port + 2}" if args.client == "h2" else ""
        target = Target(gateway, f"http://127.0.0.1:{registry_port}", tmp, logs, edge)
        if args.edge_inflight is not _KEEP:
            apply_mode(target.registry, args.model, {"edge_inflight": args.edge_inflight})
        measure(report, target, args)
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
