"""The prediction cache: how long a hit takes inside the service, and single flight.

    python -m bench.cache [--requests 2000] [--bursts 5] [--quick]

Issue 19's targets: a cache hit takes <= 1 ms p99 inside the service; a burst of 100 identical
requests runs once. Starts its own ``infermesh up`` (gateway 8050, registry 8250, control
8150), turns the cache on for mlp version 1 (``PUT /v1/models/mlp/versions/1/cache``), then:

(a) ``--requests`` sequential requests (c=1, one kept-alive connection, aiohttp) of one body
    (hits, after its first miss), then as many of distinct bodies (misses). "Inside the
    service" is the router's own histogram ``infermesh_router_request_duration_seconds``
    (router receipt to response, hits included): it has no cache label, so the benchmark
    reads its buckets before and after each phase and reports the phase's p99 as the bucket
    bound it falls in (buckets 0.5, 1, 2, 3, 5 ms...) and the share of requests <= 1 ms; and
    beside it the client's end-to-end p50/p99 of hits and misses (gateway and loopback included).
(b) ``--bursts`` times, ``--burst`` identical concurrent requests of a body never sent before:
    the worker's ``infermesh_worker_rows_total`` (its /metrics) before and after counts the
    rows it executed (1 row per request: must be 1), with the answers' ``cache`` parameter
    (``miss``, ``coalesced``: joined the running execution, ``hit``: arrived after it ended).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import uvloop

from bench.credentials import auth_headers
from bench.mesh import Mesh, call, metric_total, ok, sigterm_unwinds, start_mesh
from bench.payloads import infer_path, request_body
from bench.rawhttp import RawClient
from bench.report import heading, machine, write_report
from bench.result import Percentiles

MODEL = "mlp"
DURATION = "infermesh_router_request_duration_seconds_bucket"
ROWS = "infermesh_worker_rows_total"
POLICY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Phase:
    """Sequential requests of one kind (``hit`` or ``miss``)."""

    kind: str
    requests: int
    client: Percentiles
    router_p99_bound_ms: float | None
    """The router histogram bucket the phase's p99 falls in (None: no sample)."""
    router_share_le_1ms: float | None
    served_as: dict[str, int]
    """The answers' Infermesh-Cache values."""


@dataclass(frozen=True)
class Burst:
    requests: int
    executions: float
    """Rows the worker ran during the burst (one row per request)."""
    served_as: dict[str, int]


@dataclass
class CacheReport:
    command: str
    started: datetime
    phases: list[Phase] = field(default_factory=list)
    bursts: list[Burst] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [*heading(self.command, self.started),
                 "| c=1 | requests | client p50 ms | client p99 ms | router p99 (bucket) ms "
                 "| router ≤ 1 ms | served as |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in self.phases:
            share = "n/a" if p.router_share_le_1ms is None else (
                f"{100 * p.router_share_le_1ms:.1f} %")
            lines.append(f"| {p.kind} | {p.requests} | {p.client.p50:.2f} | {p.client.p99:.2f} "
                         f"| ≤ {p.router_p99_bound_ms} | {share} | {_counts(p.served_as)} |")
        lines += ["", "| burst | identical concurrent requests | worker executions | served as |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {i} | {b.requests} | {b.executions:g} | {_counts(b.served_as)} |"
                  for i, b in enumerate(self.bursts)]  # fmt: skip
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"command": self.command, "started": self.started.isoformat(),
                "machine": machine(), "phases": [asdict(p) for p in self.phases],
                "bursts": [asdict(b) for b in self.bursts]}  # fmt: skip


def _counts(served: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(served.items()))


def enable_cache(mesh: Mesh) -> None:
    """Turn the cache on for mlp/1; return once an answer says it was cached or missed."""
    ok(call(mesh.registry, "PUT", f"/v1/models/{MODEL}/versions/1/cache", {"ttl_s": 3600}),
       "PUT cache")  # fmt: skip
    deadline = time.monotonic() + POLICY_TIMEOUT_S
    while "Infermesh-Cache" not in call(mesh.gateway, "POST", infer_path(MODEL),
                                        raw=request_body(MODEL, 1, seed=10**6)).headers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router applied no cache policy in {POLICY_TIMEOUT_S:.0f}s")
        time.sleep(0.2)


def router_buckets(mesh: Mesh) -> dict[float, float]:
    """The router's cumulative duration buckets for mlp, by upper bound (seconds)."""
    router = mesh.service_url("router")
    bounds = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1,
              float("inf"))  # fmt: skip
    return {b: metric_total(router, DURATION, model=MODEL, le=_le(b)) for b in bounds}


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def p99_bound(
    before: dict[float, float], after: dict[float, float]
) -> tuple[float | None, float | None]:
    """(the bucket bound, ms, holding the 99th percentile of what was observed between two
    snapshots; the share observed at or under 1 ms)."""
    delta = {b: after[b] - before[b] for b in after}
    total = delta[float("inf")]
    if total <= 0:
        return None, None
    bound = next(b for b in sorted(delta) if delta[b] >= 0.99 * total)
    return bound * 1000, delta[0.001] / total


async def sequential(mesh: Mesh, bodies: list[bytes]) -> tuple[list[float], Counter[str]]:
    """Send ``bodies`` one after another on one connection; latencies (s), cache headers."""
    url, served, latencies = mesh.gateway + infer_path(MODEL), Counter[str](), []
    async with aiohttp.ClientSession(headers=auth_headers(mesh.gateway)) as session:
        for body in bodies:
            began = time.perf_counter()
            async with session.post(url, data=body, headers=_JSON) as response:
                await response.read()
                latencies.append(time.perf_counter() - began)
                served[response.headers.get("Infermesh-Cache", "none")] += 1
    return latencies, served


_JSON = {"Content-Type": "application/json"}


def phase(mesh: Mesh, kind: str, bodies: list[bytes]) -> Phase:
    before = router_buckets(mesh)
    latencies, served = uvloop.run(sequential(mesh, bodies))
    bound, share = p99_bound(before, router_buckets(mesh))
    return Phase(kind, len(bodies), Percentiles.of(latencies), bound, share, dict(served))


async def concurrent(mesh: Mesh, body: bytes, count: int) -> Counter[str]:
    """``count`` identical requests at once: ``count`` connections opened first, then every
    request written in one pass of the loop (``bench.rawhttp``; aiohttp's client takes longer
    to send 100 requests than the mlp takes to answer the first). Their ``cache`` parameters."""
    client = RawClient(mesh.gateway + infer_path(MODEL), body, headers=auth_headers(mesh.gateway))
    try:
        await client.connect(count)
        answers = await asyncio.gather(*(client.post() for _ in range(count)))
    finally:
        client.close()
    return Counter(f"{status} {_served_as(raw)}" for status, raw in answers)


def _served_as(raw: bytes) -> str:
    try:
        return str((orjson.loads(raw).get("parameters") or {}).get("cache", "none"))
    except (orjson.JSONDecodeError, AttributeError):
        return "unreadable"


def burst(mesh: Mesh, seed: int, count: int) -> Burst:
    worker = mesh.service_url(f"worker-{MODEL}")  # the model's shared worker
    before = metric_total(worker, ROWS)
    served = uvloop.run(concurrent(mesh, request_body(MODEL, 1, seed=seed), count))
    return Burst(count, metric_total(worker, ROWS) - before, dict(served))


def measure(mesh: Mesh, args: argparse.Namespace, report: CacheReport) -> None:
    enable_cache(mesh)
    report.phases.append(phase(mesh, "hit", [request_body(MODEL, 1, seed=0)] * args.requests))
    misses = [request_body(MODEL, 1, seed=1 + i) for i in range(args.requests)]
    report.phases.append(phase(mesh, "miss", misses))
    for index in range(args.bursts):
        report.bursts.append(burst(mesh, 2 * 10**6 + index, args.burst))
    ok(call(mesh.registry, "DELETE", f"/v1/models/{MODEL}/versions/1/cache"), "DELETE cache")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--requests", type=int, default=2000, help="sequential hits, and as many misses")
    add("--bursts", type=int, default=5)
    add("--burst", type=int, default=100, help="identical concurrent requests per burst")
    add("--quick", action="store_true", help="smoke run: 100 requests, 1 burst")
    add("--ports", type=int, nargs=2, default=(8050, 8250), metavar=("GATEWAY", "REGISTRY"))
    add("--out", type=Path, help="JSON path (default bench/results/cache-DATE.json)")
    add("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    add("--ready-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.bursts = 100, 1
    for name in ("requests", "bursts", "burst"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = datetime.now(UTC)
    report = CacheReport(shlex.join(["python", "-m", "bench.cache", *argv]), started)
    out = args.out or Path("bench/results") / f"cache-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    with sigterm_unwinds(), ExitStack() as stack:
        measure(start_mesh(stack, args, logs, tuple(args.ports)), args, report)
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
