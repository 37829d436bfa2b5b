"""Run every benchmark in one go and write a Markdown table plus a JSON file.

    python -m bench.run_all [--duration 10] [--out bench/results/DATE.json] [--only baselines]

Steps: (a) the demo models in-process at batch 32; (b) the plain aiohttp server for ``mlp``,
closed loop; (c) ``infermesh up`` and ``infermesh up --fused``: closed loop for ``mlp`` and
``encoder``, then an open-loop Poisson run for ``mlp`` at 80% of the closed-loop rate.
Closed loops use wrk where installed (it leaves the server more CPU), else ``bench.loadgen``.
"""

from __future__ import annotations

import argparse
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
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import orjson
import uvloop

from bench.inprocess import measure_inprocess
from bench.loadgen import run_closed, run_open
from bench.models import DEFAULT_CACHE_DIR
from bench.report import OPEN_LOAD_FRACTION, Report, Run
from bench.result import LoadResult
from bench.wrk import run_wrk, wrk_available

CONCURRENCY = 64
INPROCESS_BATCH = 32
STOP_TIMEOUT_S = 60.0


def closed_loop(url: str, model: str, args: argparse.Namespace) -> LoadResult:
    """Closed loop at c=64: wrk if installed, else the Python client."""
    if wrk_available():
        return run_wrk(url, model, concurrency=CONCURRENCY, duration=args.duration,
                       warmup=args.warmup)  # fmt: skip
    coro = run_closed(url, model, concurrency=CONCURRENCY, duration=args.duration,
                      warmup=args.warmup)  # fmt: skip
    return uvloop.run(coro)


@contextmanager
def serving(
    command: list[str], ready_url: str, log: Path, timeout: float, banner: str | None = None
) -> Iterator[None]:
    """Start ``command``, wait for ``ready_url`` to answer 200 (and ``banner`` to appear in its
    output), and stop it with SIGINT after."""
    if _ready(ready_url):
        raise RuntimeError(f"{ready_url} already answers before starting {command[0]}; stop it")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
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


def inprocess_step(report: Report, args: argparse.Namespace) -> None:
    """(a) Rows/s of each demo model called in-process at batch 32."""
    for model in ("mlp", "encoder"):
        rows_per_s = measure_inprocess(
            model, INPROCESS_BATCH, args.duration, cache_dir=args.cache_dir,
            artifact=_artifact(args, model),
        )  # fmt: skip
        report.inprocess_rows_per_s[model] = rows_per_s
        print(f"in-process {model} batch {INPROCESS_BATCH}: {rows_per_s:,.0f} rows/s", flush=True)


def plain_step(report: Report, args: argparse.Namespace, logs: Path) -> None:
    """(b) The plain aiohttp server for mlp, closed loop."""
    url = f"http://127.0.0.1:{args.plain_port}"
    command = [sys.executable, "-m", "bench.plain_server", "--model", "mlp",
               "--port", str(args.plain_port), "--cache-dir", str(args.cache_dir)]  # fmt: skip
    if (artifact := _artifact(args, "mlp")) is not None:
        command += ["--artifact", str(artifact)]
    with serving(command, f"{url}/v2/health/ready", logs / "plain_server.log", 120.0):
        _record(report, "plain", closed_loop(url, "mlp", args))


def mesh_step(report: Report, args: argparse.Namespace, logs: Path, *, fused: bool) -> None:
    """(c) ``infermesh up [--fused]``: closed loop for both models, open loop at 80% for mlp."""
    setup = "fused" if fused else "mesh"
    url = args.gateway_url.rstrip("/")
    with tempfile.TemporaryDirectory(prefix=f"infermesh-bench-{setup}-") as state_dir:
        command = [args.infermesh, "up", "--state-dir", state_dir] + (["--fused"] if fused else [])
        ready_url, log = f"{url}/v2/health/ready", logs / f"{setup}.log"
        with serving(command, ready_url, log, args.ready_timeout, banner="infermesh is up"):
            mlp = _record(report, setup, closed_loop(url, "mlp", args))
            _record(report, setup, closed_loop(url, "encoder", args))
            rate = OPEN_LOAD_FRACTION * mlp.rps
            coro = run_open(url, "mlp", rate=rate, duration=args.duration, warmup=args.warmup)
            _record(report, setup, uvloop.run(coro))
        # Keep the services' own logs (and the batch sizes they saw) next to the figures.
        shutil.copytree(Path(state_dir) / "logs", logs / f"{setup}-services", dirs_exist_ok=True)


def _record(report: Report, setup: str, result: LoadResult) -> LoadResult:
    report.runs.append(Run(setup, result))
    print(f"{setup}: {result.summary_line()}", flush=True)
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
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8000")
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
    inprocess_step(report, args)
    plain_step(report, args, logs)
    if args.only == "all":
        mesh_step(report, args, logs, fused=False)
        mesh_step(report, args, logs, fused=True)
    markdown = report.markdown()
    print("\n" + markdown)
    out.write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')} (server logs in {logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
