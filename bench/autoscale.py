"""The autoscaler under a load step (issue 17's target): 1x -> 4x on the mlp, local actuator.

    python -m bench.autoscale [--base-rate 15] [--step 4] [--before 30] [--during 90]
                              [--after 150] [--slo-ms 1000] [--max-replicas 6]

Starts ``infermesh up`` (mesh mode, its own ports, etcd, Postgres and state dir) with the
`worker.run_batch=sleep:50` failpoint and the mlp at max batch size 1: each mlp worker then
serves ~20 requests/s whatever the CPU, so the step exceeds one worker and more workers really
add capacity even on a 2-core machine (the real mlp would serve the whole step from one
worker). The mlp opts in to autoscaling through the registry (`PATCH .../autoscaling`,
`min_replicas` 1; capacity learned, not given), the control API ticks every second.

Open load (the project's raw HTTP/1.1 client, each arrival its own task, on an even grid):
``--base-rate`` req/s for ``--before`` s, ``--step`` x that for ``--during`` s, then nothing
until the workers are back at the minimum (at most ``--after`` s). Every request carries a
10 s deadline (`X-Request-Timeout`). Per second: offered, answered, failed, p99 latency of the
requests sent in that second, worker processes of mlp/1 (started, not necessarily ready: read
from /proc) and the autoscaler's desired count (the control API's /metrics).

With ``--noise 0.2 --step 1 --during 300`` it is the steady-load check instead (the rate
changes by up to ±20 % every ``--noise-period`` s; target: at most one change of direction of
the desired count, reported as ``direction_changes``).

Reported: seconds from the step until p99 stays within ``--slo-ms`` for the rest of the step
(target: <= one worker start-up + 10 s, the start-up being the spec's `startup_seconds`),
seconds from the end of the load until the worker count is back at the minimum (target: the
downscale delay plus the stable window's turnover), and failed requests (target: 0). JSON under
bench/results/autoscale-<time>.json. Run it on a quiet machine: a busy one starts workers late.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.credentials import auth_headers
from bench.payloads import infer_path, request_body
from bench.rawhttp import RawClient
from bench.run_all import SETUPS, start_launcher

DEADLINE_S = 10.0
MIN_REPLICAS = 1


@dataclass(frozen=True, slots=True)
class Sent:
    """One request: when it was sent (seconds from the start), how long it took, its status
    (0: no answer)."""

    at: float
    latency: float
    status: int


@dataclass(frozen=True, slots=True)
class Second:
    """One second of the run."""

    t: int
    offered: int
    answered: int
    failed: int
    p99_ms: float | None
    workers: int
    desired: int | None


def per_second(sent: Sequence[Sent], fleet: Mapping[int, tuple[int, int | None]]
               ) -> list[Second]:
    """The run by second of sending; `fleet`: (worker processes, desired) by second."""
    seconds = max([int(s.at) for s in sent] + list(fleet), default=-1) + 1
    rows = []
    for t in range(seconds):
        these = [s for s in sent if int(s.at) == t]
        ok = sorted(s.latency for s in these if s.status == 200)
        workers, desired = fleet.get(t, (0, None))
        rows.append(Second(t, len(these), len(ok), len(these) - len(ok), _p99_ms(ok),
                           workers, desired))
    return rows


def _p99_ms(latencies: Sequence[float]) -> float | None:
    if not latencies:
        return None
    return 1000 * latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]


def recovery_s(rows: Sequence[Second], *, step_at: int, step_end: int,
               slo_ms: float) -> float | None:
    """Seconds from the step until every later second of the step has p99 within the SLO
    (and no failure); None if it never settles."""
    during = [r for r in rows if step_at <= r.t < step_end]
    for i, row in enumerate(during):
        if all(r.failed == 0 and (r.p99_ms or 0.0) <= slo_ms for r in during[i:]):
            return float(row.t - step_at)
    return None


def back_to_min_s(rows: Sequence[Second], *, load_end: int) -> float | None:
    """Seconds from the end of the load until the worker processes are at the minimum."""
    for row in rows:
        if row.t >= load_end and row.workers <= MIN_REPLICAS:
            return float(row.t - load_end)
    return None


def mlp_workers(marker: str) -> int:
    """Live worker processes of mlp/1 in this run's mesh (their environment carries both):
    the mlp model's shared workers (the default), or mlp/1's own under
    `INFERMESH_WORKERS_PER=version`."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if marker.encode() in environ and any(
                f"INFERMESH_WORKER_MODELS={served}\0".encode() in environ
                for served in ("mlp", "mlp/1")):
            count += 1
    return count


def desired_replicas(control: str) -> int | None:
    """The autoscaler's desired count of mlp/1 from the control API's /metrics."""
    try:
        with urllib.request.urlopen(f"{control}/metrics", timeout=2.0) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("infermesh_autoscaler_desired_replicas{") and 'model="mlp"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def patch_registry(registry: str, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        registry + path, method="PATCH", data=orjson.dumps(body),
        headers={"Content-Type": "application/json", **auth_headers(registry)})
    with urllib.request.urlopen(request, timeout=10.0):
        pass


async def drive(url: str, args: argparse.Namespace, marker: str, control: str
                ) -> tuple[list[Sent], dict[int, tuple[int, int | None]], int, int]:
    """Send the stepped load, sample the fleet every second; (sent, fleet, step at, load end)."""
    headers = {**auth_headers(url), "X-Request-Timeout": str(DEADLINE_S)}
    client = RawClient(url + infer_path("mlp"), request_body("mlp"), headers=headers)
    sent: list[Sent] = []
    fleet: dict[int, tuple[int, int | None]] = {}
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    step_at, load_end = args.before, args.before + args.during

    async def one(at: float) -> None:
        try:
            status, _ = await asyncio.wait_for(client.post(), DEADLINE_S + 5)
        except (OSError, TimeoutError):
            status = 0
        sent.append(Sent(at, time.monotonic() - started - at, status))

    async def sample() -> None:
        while True:
            t = int(time.monotonic() - started)
            fleet[t] = (await asyncio.to_thread(mlp_workers, marker),
                        await asyncio.to_thread(desired_replicas, control))
            if t >= load_end and fleet[t][0] <= MIN_REPLICAS or t >= load_end + args.after:
                return
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    noise = noise_factors(args.noise, args.noise_period, load_end, seed=args.seed)
    at = 0.0
    while at < load_end:
        rate = args.base_rate * (args.step if at >= step_at else 1.0)
        rate *= noise[int(at // args.noise_period)]
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        task = asyncio.create_task(one(at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        at += 1.0 / rate
    await asyncio.gather(*tasks)
    await sampler
    client.close()
    return sent, fleet, step_at, load_end


def noise_factors(noise: float, period: float, length: float, *, seed: int) -> list[float]:
    """One rate factor in [1 - noise, 1 + noise] per `period` seconds of the load (seeded)."""
    draw = random.Random(seed)
    return [1.0 + noise * draw.uniform(-1.0, 1.0)
            for _ in range(int(length // period) + 2)]


def direction_changes(rows: Sequence[Second]) -> int:
    """How often the desired count turned from rising to falling or back."""
    desired = [r.desired for r in rows if r.desired is not None]
    moves = [b - a for a, b in zip(desired, desired[1:], strict=False) if b != a]
    return sum(1 for a, b in zip(moves, moves[1:], strict=False) if (a > 0) != (b > 0))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base-rate", type=float, default=15.0, help="1x load, requests/s")
    parser.add_argument("--step", type=float, default=4.0)
    parser.add_argument("--before", type=int, default=30, help="seconds at 1x")
    parser.add_argument("--during", type=int, default=90, help="seconds at the step")
    parser.add_argument("--after", type=int, default=150, help="most seconds to wait after")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="steady-load check: each --noise-period the rate is scaled by a "
                        "factor in [1-noise, 1+noise] (e.g. 0.2 with --step 1 --during 300)")
    parser.add_argument("--noise-period", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slo-ms", type=float, default=1000.0)
    parser.add_argument("--max-replicas", type=int, default=6)
    parser.add_argument("--startup-seconds", type=float, default=10.0)
    parser.add_argument("--downscale-delay", type=float, default=30.0)
    parser.add_argument("--stable-window", type=float, default=30.0)
    parser.add_argument("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    parser.add_argument("--ready-timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("bench/results") / f"autoscale-{stamp}.json"
    logs = out.with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    marker = f"infermesh-autoscale-{uuid.uuid4().hex[:8]}"
    scaling = {"min_replicas": MIN_REPLICAS, "max_replicas": args.max_replicas,
               "startup_seconds": args.startup_seconds, "target_wait": 0.1,
               "downscale_delay": args.downscale_delay, "stable_window": args.stable_window,
               "panic_window": min(6.0, args.stable_window)}
    with ExitStack() as stack:
        url = start_launcher(stack, args, logs, "mesh", extra_env={
            "INFERMESH_FAILPOINTS": "worker.run_batch=sleep:50", "INFERMESH_TEST_MARKER": marker,
            "INFERMESH_CONTROL_AUTOSCALER_INTERVAL": "1", "INFERMESH_GATEWAY_AUTH": "0"})
        registry_port = SETUPS["mesh"][1]
        registry = f"http://127.0.0.1:{registry_port}"
        patch_registry(registry, "/v1/models/mlp/versions/1/batching", {"max_batch_size": 1})
        patch_registry(registry, "/v1/models/mlp/versions/1/autoscaling", scaling)
        sent, fleet, step_at, load_end = asyncio.run(
            drive(url, args, marker, f"http://127.0.0.1:{registry_port - 100}"))
    rows = per_second(sent, fleet)
    result = {
        "bench": "autoscale", "at": stamp, "cpus": os.cpu_count(), "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "autoscaling": scaling, "worker": "mlp, max batch size 1, sleep:50 failpoint",
        "requests": len(sent), "failed": sum(r.failed for r in rows),
        "p99_recovered_s": recovery_s(rows, step_at=step_at, step_end=load_end,
                                      slo_ms=args.slo_ms),
        "p99_target_s": args.startup_seconds + 10,
        "back_to_min_s": back_to_min_s(rows, load_end=load_end),
        "max_workers": max((r.workers for r in rows), default=0),
        "direction_changes": direction_changes(rows),
        "seconds": [asdict(r) for r in rows],
    }
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps({k: v for k, v in result.items() if k != "seconds"},
                       option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {out} (server logs in {logs})")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
