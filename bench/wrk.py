"""Closed-loop load with ``wrk``, reported in the same :class:`LoadResult` shape as ``loadgen``.

wrk costs far less CPU per request than the Python client, so on a small machine it takes
less CPU away from the server; closed-loop figures should come from here. A generated Lua
script POSTs the body and, in ``done()``, prints one machine-readable line with the exact
request count, error counts and the 50/99/99.9 percentiles and max (``--latency`` output is
kept for humans but only lists 50/75/90/99%).

    python -m bench.wrk --url http://127.0.0.1:8500 --model mlp --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import orjson

from bench.payloads import infer_path, request_body
from bench.result import LoadResult, Percentiles

MARKER = "INFERMESH_WRK "
LUA_TEMPLATE = """
local f = assert(io.open([==[{body_path}]==], "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
{extra_headers}

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{marker}{{"requests":%.0f,"duration_us":%.0f,"connect":%.0f,"read":%.0f,"write":%.0f,'
    .. '"status":%.0f,"timeout":%.0f,"p50_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,"max_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""
SOCKET_ERRORS = ("connect", "read", "write", "timeout")


def wrk_available() -> bool:
    """Return whether a ``wrk`` binary is on ``PATH``."""
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    model: str,
    *,
    concurrency: int = 64,
    duration: float = 10.0,
    warmup: float = 0.0,
    rows: int = 1,
    threads: int = 1,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    """Run wrk against ``model``'s infer endpoint; ``duration`` and ``warmup`` round to seconds."""
    target = url.rstrip("/") + infer_path(model)
    with tempfile.TemporaryDirectory(prefix="infermesh-wrk-") as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(request_body(model, rows))
        script = Path(tmp) / "post.lua"
        extra = "\n".join(f'wrk.headers["{name}"] = [==[{value}]==]'
                           for name, value in (headers or {}).items())
        script.write_text(LUA_TEMPLATE.format(body_path=body_path, marker=MARKER,
                                              extra_headers=extra))
        if warmup > 0:
            _wrk(script, target, concurrency=concurrency, seconds=warmup, threads=threads)
        stdout = _wrk(script, target, concurrency=concurrency, seconds=duration, threads=threads)
    return parse_wrk(stdout, url=url, model=model, concurrency=concurrency, rows=rows)


def _wrk(script: Path, target: str, *, concurrency: int, seconds: float, threads: int) -> str:
    whole_seconds = max(1, round(seconds))
    command = [
        "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{whole_seconds}s",
        "--timeout", "30s", "--latency", "-s", str(script), target,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=whole_seconds + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout}")
    return done.stdout


def parse_wrk(stdout: str, *, url: str, model: str, concurrency: int, rows: int) -> LoadResult:
    """Parse the ``done()`` line of the generated script into a :class:`LoadResult`."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary line:\n{stdout}")
    stats = json.loads(line[len(MARKER) :])
    duration = stats["duration_us"] / 1e6
    socket_errors = {name: int(stats[name]) for name in SOCKET_ERRORS if stats[name]}
    samples = [f"{name} errors: {count}" for name, count in socket_errors.items()]
    if stats["status"]:
        samples.insert(0, f"non-2xx/3xx responses: {int(stats['status'])}")
    ok = int(stats["requests"] - stats["status"])
    return LoadResult(
        tool="wrk",
        mode="closed",
        model=model,
        url=url,
        duration_s=duration,
        requests=int(stats["requests"]) + sum(socket_errors.values()),
        errors=int(stats["status"]) + sum(socket_errors.values()),
        rps=ok / duration,
        latency=Percentiles(
            p50=stats["p50_us"] / 1000,
            p99=stats["p99_us"] / 1000,
            p999=stats["p999_us"] / 1000,
            max=stats["max_us"] / 1000,
        ),
        rows_per_request=rows,
        concurrency=concurrency,
        error_samples=samples,
    )


def main(argv: list[str] | None = None) -> int:
    """Run wrk once from the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.wrk", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default="mlp", help="demo model name (mlp, encoder)")
    parser.add_argument("--concurrency", type=int, default=64, help="open connections")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds first")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    args = parser.parse_args(argv)
    result = run_wrk(
        args.url,
        args.model,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        rows=args.rows,
        threads=args.threads,
    )
    if args.json:
        print(result.summary_line(), file=sys.stderr)
        sys.stdout.buffer.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
