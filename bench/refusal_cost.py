"""What a refused request costs, per hop, next to a served one (issue 14).

    python -m bench.refusal_cost [--requests 10000] [--concurrency 64] [--rounds 2]

Starts the mesh as ``bench.cpu_per_request`` does (auth on, a tenant whose quotas never bind),
then alternates two closed loops of ``--requests`` mlp requests each (h2load, HTTP/1.1):

- ``served``: ordinary requests, answered 200;
- ``refused``: the same requests with ``X-Request-Start`` 5 s in the past and
  ``X-Request-Timeout: 1``, so each has expired before it reached the gateway, which answers
  504 without forwarding it: the cheapest refusal there is, the path load shedding takes.

and reports µs of CPU per request of each process (``/proc/<pid>/stat``, as
``bench.cpu_per_request``). Goodput beyond capacity depends on the ratio: with a refusal
costing a share ``r`` of a served request's CPU, at ``k`` times capacity at most
``(1 - k·r) / (1 - r)`` of capacity can still be served (``k = 2``: 0.75 at ``r = 0.2``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import proc_cpu
from bench.cpu_per_request import parse_summary, start_system
from bench.credentials import auth_headers
from bench.h2load import H2LOAD, run_together
from bench.models import DEFAULT_CACHE_DIR
from bench.payloads import infer_path, request_body

MODEL = "mlp"


def run(url: str, roots: set[int], extra: list[str], requests: int, concurrency: int,
        tmp: Path) -> tuple[int, dict[str, float]]:
    """One closed loop; (requests answered, µs of CPU per request by process label)."""
    body = tmp / "body.json"
    body.write_bytes(request_body(MODEL, 1))
    command = [H2LOAD, "--h1", "-t", "1", "-n", str(requests), "-c", str(concurrency),
               "-d", str(body), "-H", "content-type: application/json"]  # fmt: skip
    for name, value in auth_headers(url).items():
        command += ["-H", f"{name}: {value}"]
    for header in extra:
        command += ["-H", header]
    output = tmp / "h2load.out"
    before = proc_cpu.tree_cpu(roots)
    run_together([[*command, url + infer_path(MODEL)]], [output], 600.0)
    after = proc_cpu.tree_cpu(roots)
    done, _, _ = parse_summary(output.read_text())
    per: dict[str, float] = {}
    for key, seconds in after.items():
        label = proc_cpu.label_of(key.pid)
        per[label] = per.get(label, 0.0) + (seconds - before.get(key, 0.0)) / done * 1e6
    return done, per


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refusal_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--infermesh", default=".venv/bin/infermesh")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.requests < args.concurrency:
        raise SystemExit("--requests must be at least --concurrency")
    args.cache_dir, args.artifact_dir, args.plain_port = DEFAULT_CACHE_DIR, None, 8500
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="infermesh-refusal-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        before_start = proc_cpu.children_of(os.getpid())
        url = start_system(stack, "mesh", args, logs)
        roots = proc_cpu.with_postmasters(proc_cpu.children_of(os.getpid()) - before_start)
        run(url, roots, [], max(args.concurrency, args.requests // 4), args.concurrency, Path(tmp))
        print("| round | requests | gateway µs | router µs | batcher µs | worker µs | all µs |")
        print("|---|---|--:|--:|--:|--:|--:|")
        for round_ in range(args.rounds):
            for kind in ("served", "refused"):
                extra = [] if kind == "served" else [
                    f"X-Request-Start: t={time.time() - 5:.3f}", "X-Request-Timeout: 1"]
                done, per = run(url, roots, extra, args.requests, args.concurrency, Path(tmp))
                worker = sum(v for k, v in per.items() if k.startswith("worker"))
                print(f"| {round_} | {kind} ({done:,}) | {per.get('gateway', 0):.0f} | "
                      f"{per.get('router', 0):.0f} | {per.get('batcher', 0):.0f} | "
                      f"{worker:.0f} | {sum(per.values()):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
