"""CPU time per request, per hop: the plain server, fused mode and the mesh, one after another.

    python -m bench.cpu_per_request [--requests 20000] [--concurrency 64]
                                    [--systems plain,fused,mesh] [--protocols rest,grpc]

Each system runs alone, started as ``bench.run_all`` starts it (``bench.plain_server``;
``infermesh up`` and ``infermesh up --fused`` with their own etcd, Postgres and state dir, auth
on), and is stopped before the next one starts. After ``--warmup-requests`` unmeasured
requests, h2load (nghttp2's C client) sends exactly ``--requests`` mlp requests over
``--concurrency`` HTTP/1.1 connections, one request in flight on each (a closed loop); unlike
wrk, which runs for a duration, it stops at a request count, so nothing is cut off mid-flight.

Around that run the CPU time (user + system, ``/proc/<pid>/stat``) of every process of the
system is read (see ``bench.proc_cpu``); the client's own comes from its rusage. Each figure is
divided by the requests answered: µs of CPU per request, per process. Data-plane hops (gateway,
router, batcher, workers, fused, nginx) sum to ``hops``; Postgres (the prediction log) and etcd
are stores; registry, control API and launcher are the control plane, idle during the run, so
their figures are idle costs spread over the requests. ``all processes`` sums everything but
the client. Ratios are to the plain server's figure of the same run. CPU time is counted in
clock ticks (10 ms), so at 20,000 requests a hop's figure is good to a few µs. A process that
exits during the run loses its CPU from the count; one that starts is counted from zero.

``--protocols rest,grpc`` measures unary gRPC ``ModelInfer`` too, on the same running system
right after its REST run (the plain server has no gRPC): h2load over h2c, ``--concurrency``
streams as ``--grpc-connections`` connections of equal shares, the tensor in
``raw_input_contents`` (see ``bench.grpc_load``); its column is ``<system> grpc``.
``rest-edge`` and ``grpc-edge`` send the same through the launcher's nginx edge (started for
them on the gateway's port + 2; nginx's CPU is a hop): REST JSON over h2c with the gRPC run's
connections and streams, and gRPC, which the edge hands to the gateway's REST port as HTTP/1.1
(services/gateway/grpc_bridge.py) unless ``--edge-grpc-bridge off`` sends it to grpc.aio.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import grpc_load, proc_cpu
from bench.cpu_report import CpuReport, SystemRun
from bench.credentials import auth_headers, remember_key
from bench.goodput import unlimited_tenant
from bench.h2load import H2LOAD, parse_log, run_together
from bench.models import DEFAULT_CACHE_DIR
from bench.payloads import infer_path, request_body
from bench.report import write_report
from bench.result import Percentiles
from bench.run_all import SETUPS, start_launcher, start_plain

SYSTEMS = ("plain", "fused", "fused2", "fused3", "replicas2", "mesh")
"""fused2 is `infermesh up --fused --processes 2`: a core process and a front on one port;
fused3 `--processes 3`: two fronts on it, and a core that only batches and runs the model;
replicas2 `--processes 2 --layout replicas`: two whole fused processes on it."""
MODEL = "mlp"
PROTOCOLS = ("rest", "grpc", "rest-edge", "grpc-edge")
EDGE_OFFSET = 2
"""The edge's h2c port is the gateway's HTTP port + 2 (its gRPC port is + 1)."""


@dataclass(frozen=True)
class ClientRun:
    """What h2load reported for one run, and the CPU it spent."""

    done: int
    succeeded: int
    seconds: float
    cpu_s: float
    latency: Percentiles | None = None
    """Of the answered requests (any status), from h2load's per-request log; None if none."""


def h2load_command(url: str, body: Path, *, requests: int, concurrency: int,
                   log_file: Path | None = None, streams: int | None = None,
                   auth_url: str | None = None) -> list[str]:  # fmt: skip
    """h2load, one thread, exactly ``requests`` POSTs over ``concurrency`` conns: HTTP/1.1, or
    h2c with ``streams`` per connection when given (the edge); ``log_file``: one line per
    request (see ``bench.h2load.parse_log``); ``auth_url``: whose API key to send (``url``'s)."""
    command = [H2LOAD, "-t", "1", "-n", str(requests), "-c", str(concurrency),
               "-d", str(body), "-H", "content-type: application/json"]  # fmt: skip
    command += ["--h1"] if streams is None else ["-m", str(streams)]
    command += ["--log-file", str(log_file)] if log_file is not None else []
    for name, value in auth_headers(auth_url or url).items():
        command += ["-H", f"{name.lower()}: {value}"]
    return [*command, url.rstrip("/") + infer_path(MODEL)]


def parse_summary(text: str) -> tuple[int, int, float]:
    """(requests done, requests answered 2xx/3xx, seconds) from h2load's summary."""
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", text)
    finished = re.search(r"finished in ([\d.]+)(us|ms|s)\b", text)
    if counts is None or finished is None:
        raise RuntimeError(f"no request counts in h2load's summary:\n{text[-2000:]}")
    seconds = float(finished.group(1)) / {"us": 1e6, "ms": 1e3, "s": 1.0}[finished.group(2)]
    return int(counts.group(1)), int(counts.group(2)), seconds


def run_h2load(url: str, *, requests: int, concurrency: int, timeout: float,
               streams: int | None = None, auth_url: str | None = None) -> ClientRun:
    """One h2load run against ``url`` (see `h2load_command`); raises if it fails or no
    request succeeds."""
    with tempfile.TemporaryDirectory(prefix="infermesh-cpu-") as tmp:
        body, output = Path(tmp) / "body.json", Path(tmp) / "h2load.out"
        log = Path(tmp) / "requests.log"
        body.write_bytes(request_body(MODEL, 1))
        command = h2load_command(url, body, requests=requests, concurrency=concurrency,
                                 log_file=log, streams=streams, auth_url=auth_url)  # fmt: skip
        cpu_s = run_together([command], [output], timeout)
        done, succeeded, seconds = parse_summary(output.read_text())
        latency = latency_of(log.read_text() if log.exists() else "")
    if succeeded == 0:
        raise RuntimeError(f"no request to {url} succeeded ({done} done)")
    return ClientRun(done, succeeded, seconds, cpu_s, latency)


def latency_of(log: str) -> Percentiles | None:
    """Percentiles of the answered requests in an h2load ``--log-file`` (failed streams left
    out); None when it lists none."""
    latencies = [r.latency_s for r in parse_log(log) if r.status > 0]
    return Percentiles.of(latencies) if latencies else None


def start_system(stack: ExitStack, system: str, args: argparse.Namespace, logs: Path) -> str:
    """Start ``system`` on ``stack`` and return its base URL.

    A launcher's requests go as a tenant whose quotas never bind (`bench.goodput`'s): quotas
    are still checked on every request, but the demo tenant's rate, split between the
    gateway processes of ``fused2`` (each replica enforces its share), refused the busier one's
    excess with 429s: a measurement of quotas, not of the data plane's cost."""
    if system == "plain":
        return start_plain(stack, args, logs)
    token = secrets.token_urlsafe(16)
    gateway_port, registry_port = SETUPS[system]
    extra_env = {"INFERMESH_CONTROL_ADMIN_TOKENS": f"bench:{token}"}
    if any(p.endswith("-edge") for p in _protocols_of(system, args)):
        extra_env |= {"INFERMESH_EDGE": "1",
                      "INFERMESH_EDGE_PORT": str(gateway_port + EDGE_OFFSET),
                      "INFERMESH_EDGE_GRPC_BRIDGE": "1" if args.edge_grpc_bridge == "on" else "0"}
    url = start_launcher(stack, args, logs, system, extra_env=extra_env)
    remember_key(url, unlimited_tenant(f"http://127.0.0.1:{registry_port - 100}", token))
    return url


def measure(system: str, args: argparse.Namespace, logs: Path) -> list[SystemRun]:
    """Start ``system`` alone, warm it up, measure one run per protocol, stop it (and anything
    it left)."""
    seen: set[proc_cpu.ProcessKey] = set()
    runs: list[SystemRun] = []
    with ExitStack() as stack:
        # Registered first, so it runs last: after the system's own stop.
        stack.callback(proc_cpu.kill_leftovers, seen)
        before_start = proc_cpu.children_of(os.getpid())
        url = start_system(stack, system, args, logs)
        roots = proc_cpu.with_postmasters(proc_cpu.children_of(os.getpid()) - before_start)
        seen.update(proc_cpu.tree_cpu(roots))
        for protocol in _protocols_of(system, args):
            load = _load(protocol, url, args)
            if args.warmup_requests:
                load(args.warmup_requests)
            before = proc_cpu.tree_cpu(roots)
            client = load(args.requests)
            after = proc_cpu.tree_cpu(roots)
            seen.update(after)
            labels = {key: proc_cpu.label_of(key.pid) for key in after}
            cpu_s: dict[str, float] = {}
            for key, seconds in after.items():
                cpu_s[labels[key]] = cpu_s.get(labels[key], 0.0) + seconds - before.get(key, 0.0)
            name = system if protocol == "rest" else f"{system} {protocol}"
            runs.append(SystemRun(name, requests=client.done, succeeded=client.succeeded,
                                  seconds=client.seconds, client_cpu_s=client.cpu_s,
                                  cpu_s=cpu_s, latency=client.latency))  # fmt: skip
    return runs


def _protocols_of(system: str, args: argparse.Namespace) -> list[str]:
    """`--protocols` that apply to `system`; REST alone for a bench with no such option
    (`bench.open_tails` starts systems with `start_system` too)."""
    protocols = [p for p in getattr(args, "protocols", "rest").split(",") if p]
    return [p for p in protocols if p == "rest" or system != "plain"]


def _load(protocol: str, url: str, args: argparse.Namespace) -> Callable[[int], ClientRun]:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    edge = f"http://127.0.0.1:{port + EDGE_OFFSET}"
    if protocol == "rest":
        return _rest_load(url, args)
    if protocol == "rest-edge":
        return _rest_edge_load(url, edge, args)
    return _grpc_load(url, args, port=port + (EDGE_OFFSET if protocol == "grpc-edge" else 1))


def _rest_edge_load(url: str, edge: str, args: argparse.Namespace) -> Callable[[int], ClientRun]:
    """REST JSON over h2c through the edge, as many connections and streams as gRPC's run."""
    connections = max(1, args.grpc_connections)
    streams = max(1, args.concurrency // connections)

    def load(requests: int) -> ClientRun:
        return run_h2load(edge, requests=requests, concurrency=connections, streams=streams,
                          timeout=args.run_timeout, auth_url=url)  # fmt: skip
    return load


def _rest_load(url: str, args: argparse.Namespace) -> Callable[[int], ClientRun]:
    def load(requests: int) -> ClientRun:
        return run_h2load(url, requests=requests, concurrency=args.concurrency,
                          timeout=args.run_timeout)  # fmt: skip
    return load


def _grpc_load(url: str, args: argparse.Namespace, *, port: int) -> Callable[[int], ClientRun]:
    """Unary ModelInfer calls at ``port``: the gateway's gRPC port, or the edge's."""
    target = f"127.0.0.1:{port}"
    metadata = auth_headers(url)
    message = grpc_load.request_message(MODEL)
    answer_bytes = grpc_load.probe(target, message, metadata)
    connections = max(1, args.grpc_connections)
    streams = max(1, args.concurrency // connections)

    def load(requests: int) -> ClientRun:
        with tempfile.TemporaryDirectory(prefix="infermesh-cpu-grpc-") as tmp:
            body, output = Path(tmp) / "body.bin", Path(tmp) / "h2load.out"
            body.write_bytes(grpc_load.framed(message))
            command = grpc_load.h2load_command(
                target, str(body), metadata, requests=requests, connections=connections,
                streams=streams)
            cpu_s = run_together([command], [output], args.run_timeout)
            summary = output.read_text()
        done, _, seconds = parse_summary(summary)
        ok = grpc_load.succeeded(summary, answer_bytes, done)
        if ok == 0:
            raise RuntimeError(f"no gRPC call to {target} succeeded ({done} done)")
        return ClientRun(done, ok, seconds, cpu_s)
    return load


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_request", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="measured requests")
    parser.add_argument("--concurrency", type=int, default=64, help="connections")
    # 2,000 was too few: fused mode measured 354 µs a request after it, 241 after 10,000
    # (same machine, minutes apart): its first seconds still pay one-off costs.
    parser.add_argument("--warmup-requests", type=int, default=10_000, help="unmeasured, first")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, in order, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--protocols", default="rest",
                        help="comma-separated, from: rest, grpc (grpc: not for plain)")
    parser.add_argument("--grpc-connections", type=int, default=16,
                        help="h2c connections for gRPC; --concurrency streams in all")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/cpu-DATE.json)")
    parser.add_argument("--edge-grpc-bridge", choices=("on", "off"), default="on",
                        help="the edge sends unary gRPC to the gateway's REST port (on) or to "
                        "grpc.aio (off)")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds per h2load run")
    parser.add_argument("--plain-port", type=int, default=8500)
    parser.add_argument("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--artifact-dir", type=Path, help="DIR/mlp.pt for the plain server")
    return parser


def _checked(args: argparse.Namespace) -> list[str]:
    systems = [s for s in args.systems.split(",") if s]
    if not systems or set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: choose from {', '.join(SYSTEMS)}, got {args.systems!r}")
    for name in ("requests", "warmup_requests"):
        value = getattr(args, name)
        if value and value < args.concurrency:  # h2load refuses fewer requests than clients
            raise SystemExit(f"--{name.replace('_', '-')} must be at least --concurrency")
    protocols = [p for p in args.protocols.split(",") if p]
    if not protocols or set(protocols) - set(PROTOCOLS):
        raise SystemExit(f"--protocols: choose from {', '.join(PROTOCOLS)}, "
                         f"got {args.protocols!r}")
    return systems


def main(argv: list[str] | None = None) -> int:
    """Measure each system in turn, print the Markdown, write the JSON."""
    args = _parser().parse_args(argv)
    systems = _checked(args)
    started = datetime.now(UTC)
    command = shlex.join(["python", "-m", "bench.cpu_per_request",
                          *(sys.argv[1:] if argv is None else argv)])  # fmt: skip
    report = CpuReport(command, started, requests=args.requests, concurrency=args.concurrency)
    out = args.out or Path("bench/results") / f"cpu-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so every system started is stopped.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for system in systems:
            began = time.monotonic()
            for run in measure(system, args, logs):
                report.runs.append(run)
                print(f"{run.system}: {run.summary()} "
                      f"({time.monotonic() - began:.0f} s in all)", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
