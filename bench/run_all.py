"""Run every benchmark in one go and write a Markdown table plus a JSON file.

    python -m bench.run_all [--duration 10] [--rounds 3] [--out bench/results/DATE.json]

The plain aiohttp server, ``infermesh up`` (the mesh) and ``infermesh up --fused`` are all
started first and stay up. Then, ``--rounds`` times, interleaved: the demo models in-process at
batch 32, a closed loop (c=64) for ``mlp`` on each setup, and for ``encoder`` on mesh and
fused. Last, an open-loop Poisson run for ``mlp`` on mesh and fused at 80% of their median
closed-loop rate. Interleaving puts every setup under the same noise of the shared machine, so
the ratios (computed per round) mean something. Closed loops use wrk where installed (it leaves
the server more CPU), else ``bench.loadgen``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import uvloop

from bench.credentials import auth_headers, remember, remember_registry
from bench.inprocess import measure_inprocess
from bench.loadgen import run_closed, run_open
from bench.models import DEFAULT_CACHE_DIR
from bench.report import OPEN_LOAD_FRACTION, Report, Run, write_report
from bench.result import LoadResult
from bench.wrk import run_wrk, wrk_available

CONCURRENCY = 64
INPROCESS_BATCH = 32
STOP_TIMEOUT_S = 60.0


def closed_loop(url: str, model: str, args: argparse.Namespace) -> LoadResult:
    """Closed loop at c=64: wrk if installed, else the Python client."""
    headers = auth_headers(url)
    if wrk_available():
        return run_wrk(url, model, concurrency=CONCURRENCY, duration=args.duration,
                       warmup=args.warmup, headers=headers)  # fmt: skip
    coro = run_closed(url, model, concurrency=CONCURRENCY, duration=args.duration,
                      warmup=args.warmup, headers=headers)  # fmt: skip
    return uvloop.run(coro)


@contextmanager
def serving(
    command: list[str], ready_url: str, log: Path, timeout: float, banner: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[None]:
    """Start ``command``, wait for ``ready_url`` to answer 200 (and ``banner`` to appear in its
    output), and stop it with SIGINT after."""
    if _ready(ready_url):
        raise RuntimeError(f"{ready_url} already answers before starting {command[0]}; stop it")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    try:
        _wait_ready(process, ready_url, log, timeout, banner)
        yield
    finally:
        _stop(process)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(
    process: subprocess.Popen[bytes], url: str, log: Path, timeout: float, banner: str | None
) -> None:
    # A mesh with no model registered yet is vacuously ready: the launcher's banner says that
    # the demo models are registered and their workers warm.
    deadline = time.monotonic() + timeout
    while not (_ready(url) and (banner is None or banner.encode() in log.read_bytes())):
        if process.poll() is not None:
            raise RuntimeError(f"{log.stem} exited {process.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout:.0f}s:\n{_tail(log)}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


SETUPS = {"mesh": (8000, 8200), "fused": (8010, 8210), "fused2": (8020, 8220),
          "fused3": (8030, 8230), "replicas2": (8040, 8240)}
"""Gateway and registry ports of each launcher, so both run side by side; the gRPC port is the
gateway's + 1 and the control API's the registry's - 100."""
SIDE_BY_SIDE = ("mesh", "fused", "fused2", "fused3")
"""The launchers `--only all` starts beside the plain server (the others are for the benches
that run one system at a time)."""


def inprocess_round(report: Report, args: argparse.Namespace) -> None:
    """Rows/s of each demo model called in-process at batch 32 (one figure per round)."""
    for model in ("mlp", "encoder"):
        rows_per_s = measure_inprocess(
            model, INPROCESS_BATCH, args.duration, cache_dir=args.cache_dir,
            artifact=_artifact(args, model),
        )  # fmt: skip
        report.inprocess_rows_per_s.setdefault(model, []).append(rows_per_s)
        print(f"in-process {model} batch {INPROCESS_BATCH}: {rows_per_s:,.0f} rows/s", flush=True)


def start_plain(stack: ExitStack, args: argparse.Namespace, logs: Path) -> str:
    """The plain aiohttp server for mlp (the model inline in its handler)."""
    url = f"http://127.0.0.1:{args.plain_port}"
    command = [sys.executable, "-m", "bench.plain_server", "--model", "mlp",
               "--port", str(args.plain_port), "--cache-dir", str(args.cache_dir)]  # fmt: skip
    if (artifact := _artifact(args, "mlp")) is not None:
        command += ["--artifact", str(artifact)]
    ready, log = f"{url}/v2/health/ready", logs / "plain_server.log"
    stack.enter_context(serving(command, ready, log, 120.0))
    return url


def start_launcher(
    stack: ExitStack, args: argparse.Namespace, logs: Path, setup: str, *,
    ports: tuple[int, int] | None = None, extra_env: dict[str, str] | None = None,
) -> str:
    """``infermesh up [--fused]`` on its own ports, etcd, Postgres and state dir.

    ``ports`` (gateway, registry) overrides ``SETUPS[setup]``; ``extra_env`` adds variables
    (the gRPC and edge ports, say).
    """
    gateway_port, registry_port = ports or SETUPS[setup]
    state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"infermesh-{setup}-"))
    # Registered after the state dir, so it runs before the dir is removed.
    stack.callback(shutil.copytree, Path(state_dir) / "logs", logs / f"{setup}-services",
                   dirs_exist_ok=True)  # fmt: skip
    command = [args.infermesh, "up", "--state-dir", state_dir]
    command += ["--fused"] if setup.startswith(("fused", "replicas")) else []
    # fused2: two processes share the gateway's ports (a core and a front, deploy/fused.py);
    # fused3: two fronts share them, and the core only batches and runs the model;
    # replicas2: two whole fused processes share them, each batching for itself.
    command += ["--processes", setup[-1]] if setup in ("fused2", "fused3", "replicas2") else []
    command += ["--layout", "replicas"] if setup.startswith("replicas") else []
    url = f"http://127.0.0.1:{gateway_port}"
    env = {"INFERMESH_GATEWAY_HTTP_PORT": str(gateway_port),
           "INFERMESH_GATEWAY_GRPC_PORT": str(gateway_port + 1),
           "INFERMESH_REGISTRY_PORT": str(registry_port),
           "INFERMESH_CONTROL_PORT": str(registry_port - 100),
           "INFERMESH_EDGE": "0", **(extra_env or {})}  # fmt: skip
    stack.enter_context(serving(command, f"{url}/v2/health/ready", logs / f"{setup}.log",
                                args.ready_timeout, banner="infermesh is up", env=env))  # fmt: skip
    remember(url, Path(state_dir))
    remember_registry(f"http://127.0.0.1:{registry_port}", Path(state_dir))
    return url


def closed_round(
    report: Report, args: argparse.Namespace, urls: dict[str, str], round_: int
) -> None:
    """One closed loop per (setup, model) pair, in a fixed order."""
    for setup, url in urls.items():
        _record(report, setup, closed_loop(url, "mlp", args), round_)
    for setup, url in urls.items():
        if setup != "plain":
            _record(report, setup, closed_loop(url, "encoder", args), round_)


def open_runs(report: Report, args: argparse.Namespace, urls: dict[str, str]) -> None:
    """Poisson arrivals at 80% of the maximum rate, for mlp on mesh and fused.

    The maximum is what the same Python client reaches in a closed loop (c=64): its own CPU
    is then part of both figures, while wrk's far cheaper client would overstate what the
    Python client can offer and push the open loop past saturation.
    """
    for setup, url in urls.items():
        if setup == "plain":
            continue
        headers = auth_headers(url)
        closed = run_closed(url, "mlp", concurrency=CONCURRENCY, duration=args.duration,
                            warmup=args.warmup, headers=headers)  # fmt: skip
        maximum = _record(report, setup, uvloop.run(closed), args.rounds).rows_per_s
        coro = run_open(url, "mlp", rate=OPEN_LOAD_FRACTION * maximum, duration=args.duration,
                        warmup=args.warmup, headers=headers)  # fmt: skip
        _record(report, setup, uvloop.run(coro), args.rounds)


def _record(report: Report, setup: str, result: LoadResult, round_: int) -> LoadResult:
    report.runs.append(Run(setup, result, round_))
    print(f"[{round_}] {setup}: {result.summary_line()}", flush=True)
    return result


def _artifact(args: argparse.Namespace, model: str) -> Path | None:
    return None if args.artifact_dir is None else args.artifact_dir / f"{model}.pt"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per run")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/DATE.json)")
    parser.add_argument("--only", choices=("all", "baselines"), default="all",
                        help="'baselines' skips the mesh and fused runs")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--plain-port", type=int, default=8500)
    parser.add_argument("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--artifact-dir", type=Path,
                        help="use DIR/{mlp,encoder}.pt for the baselines instead of the demo "
                        "models (testing aid; the mesh still serves its own)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the selected steps, print the Markdown table, write the JSON."""
    args = _parser().parse_args(argv)
    started = datetime.now(UTC)
    command = shlex.join(
        ["python", "-m", "bench.run_all", *(sys.argv[1:] if argv is None else argv)]
    )
    report = Report(command=command, started=started)
    out = args.out or Path("bench/results") / f"{started:%Y-%m-%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.with_suffix(".logs")
    logs.mkdir(exist_ok=True)
    if not wrk_available():
        report.notes.append("wrk not found: closed loops used the Python client (bench.loadgen)")
    with ExitStack() as stack:
        urls = {"plain": start_plain(stack, args, logs)}
        if args.only == "all":
            for setup in SIDE_BY_SIDE:
                urls[setup] = start_launcher(stack, args, logs, setup)
        for round_ in range(args.rounds):
            inprocess_round(report, args)
            closed_round(report, args, urls, round_)
        open_runs(report, args, urls)
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
