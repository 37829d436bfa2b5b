"""A quiet tenant's latency alone and beside a noisy one: what tenancy isolation buys.

    python -m bench.noisy_neighbour [--model mlp] [--seconds 10] [--rounds 3]

Starts ``infermesh up`` (auth on), creates tenants ``quiet`` and ``noisy`` with the same quota
through the control API, and per round measures the quiet tenant sending at half its quota
(open loop): alone, then while the noisy tenant floods at ten times its own quota from a
separate client process. Reports the quiet tenant's p50/p99 in both phases, its p99 ratio
(goal: at most 1.5) and every status seen.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shlex
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.payloads import infer_path, request_body
from bench.rawhttp import RawClient
from bench.report import heading, machine, write_report
from bench.result import Percentiles
from bench.run_all import start_launcher

CONTROL = "http://127.0.0.1:8100"


@dataclass
class Phase:
    """One tenant's open-loop run: latencies of its answers and their statuses."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)


async def open_loop(url: str, key: str, body: bytes, *, rate: float, seconds: float) -> Phase:
    client = RawClient(url, body, headers={"Authorization": f"Bearer {key}"})
    phase, started = Phase(), time.monotonic()

    async def one() -> None:
        sent = time.perf_counter()
        try:
            status, _ = await client.post()
        except OSError:
            status = 0
        phase.statuses[status] += 1
        if status == 200:
            phase.latencies.append(time.perf_counter() - sent)

    tasks = []
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    client.close()
    return phase


async def make_tenant(token: str, name: str, quota: dict[str, Any]) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(f"{CONTROL}/v1/tenants", json={"name": name, **quota}) as r:
            if r.status not in (201, 409):
                raise RuntimeError(f"create tenant {name}: {r.status} {await r.text()}")
        async with session.post(f"{CONTROL}/v1/tenants/{name}/keys", json={}) as r:
            return str((await r.json())["key"])


@dataclass
class NoisyReport:
    command: str
    started: datetime
    model: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [*heading(self.command, self.started),
                 "| round | quiet alone p50 / p99 ms | quiet beside noisy p50 / p99 ms | "
                 "p99 ratio | quiet statuses beside | noisy statuses |",
                 "|---|---|---|---|---|---|"]
        for row in self.rows:
            lines.append(
                f"| {row['round']} | {row['alone'].p50:.1f} / {row['alone'].p99:.1f} | "
                f"{row['beside'].p50:.1f} / {row['beside'].p99:.1f} | {row['ratio']:.2f} | "
                f"{dict(row['quiet_statuses'])} | {dict(row['noisy_statuses'])} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"command": self.command, "started": self.started.isoformat(), "model": self.model,
                "machine": machine(), "rounds": [
                    {"round": r["round"], "ratio": r["ratio"],
                     "alone": vars(r["alone"]), "beside": vars(r["beside"]),
                     "quiet_statuses": {str(k): v for k, v in r["quiet_statuses"].items()},
                     "noisy_statuses": {str(k): v for k, v in r["noisy_statuses"].items()}}
                    for r in self.rows]}


async def measure(report: NoisyReport, gateway: str, token: str, args: argparse.Namespace) -> None:
    quota = {"rate": args.rate, "burst": max(1, args.rate // 10), "max_concurrency": 256}
    quiet = await make_tenant(token, "quiet", quota)
    noisy = await make_tenant(token, "noisy", quota)
    url, body = gateway + infer_path(args.model), request_body(args.model, 1)
    for round_ in range(args.rounds):
        alone = await open_loop(url, quiet, body, rate=args.rate / 2, seconds=args.seconds)
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.noisy_neighbour", "--flood", url, noisy,
            str(args.rate * 10), str(args.seconds), "--model", args.model,
            stdout=asyncio.subprocess.PIPE,
        )
        beside = await open_loop(url, quiet, body, rate=args.rate / 2, seconds=args.seconds)
        flood = Phase(statuses=Counter(
            {int(k): v for k, v in orjson.loads((await flooder.communicate())[0]).items()}))
        a, b = Percentiles.of(alone.latencies), Percentiles.of(beside.latencies)
        report.rows.append({"round": round_, "alone": a, "beside": b, "ratio": b.p99 / a.p99,
                            "quiet_statuses": beside.statuses, "noisy_statuses": flood.statuses})
        print(f"[{round_}] quiet alone {a.text()} | beside {b.text()} | "
              f"p99 ratio {b.p99 / a.p99:.2f} | {dict(beside.statuses)} | "
              f"noisy {dict(flood.statuses)}", flush=True)


def flood(argv: list[str]) -> int:
    """`--flood URL KEY RATE SECONDS`: the noisy tenant, in its own process so its client work
    does not slow the quiet tenant's client (only the mesh is shared); statuses on stdout."""
    url, key, rate, seconds = argv[0], argv[1], float(argv[2]), float(argv[3])
    model = argv[argv.index("--model") + 1] if "--model" in argv else "mlp"
    phase = uvloop.run(open_loop(url, key, request_body(model, 1), rate=rate, seconds=seconds))
    print(orjson.dumps({str(k): v for k, v in phase.statuses.items()}).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--flood":
        return flood(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.noisy_neighbour", description=__doc__)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--rate", type=int, default=100, help="each tenant's quota, req/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--infermesh", default=".venv/bin/infermesh")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    report = NoisyReport(shlex.join(["python", "-m", "bench.noisy_neighbour", *argv]),
                         started, args.model)
    out = args.out or Path("bench/results") / f"noisy-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    with ExitStack() as stack:
        gateway = start_launcher(stack, args, logs, "mesh", ports=(8000, 8200), extra_env={
            "INFERMESH_CONTROL_PORT": "8100", "INFERMESH_EDGE": "0",
            "INFERMESH_CONTROL_ADMIN_TOKENS": f"bench:{token}"})
        uvloop.run(measure(report, gateway, token, args))
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
