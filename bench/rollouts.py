"""What a rollout costs the data plane: mlp throughput under a stable, a split and a shadowed
rollout, as ratios to the stable one measured in the same round.

    python -m bench.rollouts [--duration 10] [--rounds 3] [--out bench/results/rollouts-DATE.json]

Starts ``infermesh up`` once, registers version 2 of mlp (the same artifact, so any difference
is the routing's), then per round sets each rollout through the control API and runs a closed
loop (c=64, wrk where installed): ``stable`` (100 % version 1), ``split`` (90/10 by a salted
hash of the request id) and ``shadow`` (stable plus a 25 % mirror to version 2, which costs
a quarter more model work on the same two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shlex
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.credentials import auth_headers, registry_credential
from bench.report import RatioReport, write_report
from bench.run_all import closed_loop, start_launcher
from control.registry_client import RegistryClient, register_file

ROLLOUTS: dict[str, dict[str, Any]] = {
    "stable": {"routes": [{"version": "1", "weight": 100}], "shadow": []},
    "split": {"routes": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}],
              "shadow": []},
    "shadow": {"routes": [{"version": "1", "weight": 100}],
               "shadow": [{"version": "2", "fraction": 0.25}]},
}


async def register_second_version(registry: str) -> None:
    from services.worker.demo_models import build_demo_models

    with tempfile.TemporaryDirectory() as outdir:
        [mlp] = [m for m in build_demo_models(Path(outdir)) if m.name == "mlp"]
        async with aiohttp.ClientSession() as session:
            client = RegistryClient(session, registry, credential=registry_credential(registry))
            await register_file(client, "mlp", "2", mlp.artifact,
                                mlp.signature, batching=mlp.batching, device="cpu")


async def put_rollout(control: str, token: str, record: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session, session.put(
        f"{control}/v1/rollouts/mlp", json=record, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"PUT rollout: {response.status} {await response.text()}")


async def wait_ready(gateway: str, timeout: float = 120.0) -> None:
    url = f"{gateway}/v2/models/mlp/versions/2/ready"
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            async with session.get(url, headers=auth_headers(url)) as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.5)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.rollouts", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="JSON path")
    parser.add_argument("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = datetime.now(UTC)
    report = RatioReport(shlex.join(["python", "-m", "bench.rollouts", *(argv or sys.argv[1:])]),
                         started, baseline="stable", label="rollout")
    out = args.out or Path("bench/results") / f"rollouts-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    with ExitStack() as stack:
        gateway = start_launcher(stack, args, logs, "mesh", ports=(8000, 8200), extra_env={
            "INFERMESH_CONTROL_PORT": "8100", "INFERMESH_EDGE": "0",
            "INFERMESH_CONTROL_ADMIN_TOKENS": f"bench:{token}"})
        asyncio.run(register_second_version("http://127.0.0.1:8200"))
        asyncio.run(wait_ready(gateway))
        for round_ in range(args.rounds):
            for setup, record in ROLLOUTS.items():
                asyncio.run(put_rollout("http://127.0.0.1:8100", token, record))
                time.sleep(1.0)
                result = closed_loop(gateway, "mlp", args)
                report.runs.setdefault(setup, []).append(result)
                print(f"[{round_}] {setup}: {result.summary_line()}", flush=True)
    write_report(report, out, logs)
    print("median ratios to stable:", report.median_ratios())
    return 0


if __name__ == "__main__":
    sys.exit(main())
