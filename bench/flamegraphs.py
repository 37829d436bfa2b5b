"""Flame graphs of each hop under load: the mesh's gateway, router, batcher and mlp worker, and
the fused process.

    python -m bench.flamegraphs [--out docs/flamegraphs] [--seconds 15]

For each system (started as ``bench.cpu_per_request`` starts it: auth on, a tenant whose quotas
never bind), h2load drives the mlp in a closed loop (HTTP/1.1, c=64) for ``--seconds`` + 15 s;
after 6 s, py-spy records every hop at 100 Hz for ``--seconds`` seconds, all at once, into
``<out>/<system>-<hop>.svg``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import proc_cpu
from bench.cpu_per_request import _parser as system_parser
from bench.cpu_per_request import start_system
from bench.credentials import auth_headers
from bench.h2load import H2LOAD
from bench.models import DEFAULT_CACHE_DIR
from bench.payloads import infer_path, request_body

HOPS = ("gateway", "router", "batcher", "worker mlp", "fused", "plain server")
FORMATS = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}
"""py-spy's output formats and their files' suffixes (`raw`: collapsed stacks, one per line)."""
PY_SPY = ".venv/bin/py-spy"


def record(system: str, args: argparse.Namespace) -> list[Path]:
    """Start ``system``, load it, record each hop; the SVGs written."""
    written: list[Path] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="infermesh-flames-") as tmp:
        url = start_system(stack, system, args, Path(tmp))
        mine = proc_cpu.tree_cpu(proc_cpu.children_of(os.getpid()))
        hops = {proc_cpu.label_of(key.pid): key.pid for key in mine
                if proc_cpu.label_of(key.pid).startswith(HOPS)}  # fmt: skip
        body = Path(tmp) / "body.json"
        body.write_bytes(request_body("mlp", 1))
        load = [H2LOAD, "--h1", "-t", "1", "-D", str(args.seconds + 15), "-c", "64",
                "-d", str(body), "-H", "content-type: application/json"]  # fmt: skip
        for name, value in auth_headers(url).items():
            load += ["-H", f"{name}: {value}"]
        client = subprocess.Popen([*load, url + infer_path("mlp")], stdout=subprocess.DEVNULL)
        try:
            time.sleep(6)  # past the first seconds' one-off costs
            spies = []
            for label, pid in hops.items():
                name = label.split(" (")[0].replace(" ", "-").replace("/", "-")
                svg = args.out / f"{system}-{name}.{FORMATS[args.format]}"
                spies.append(subprocess.Popen(
                    [PY_SPY, "record", "-p", str(pid), "-d", str(args.seconds), "-r", "100",
                     "-f", args.format, "-o", str(svg)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
                written.append(svg)
            for spy in spies:
                spy.wait(timeout=args.seconds + 60)
        finally:
            client.wait(timeout=args.seconds + 60)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flamegraphs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/flamegraphs"))
    parser.add_argument("--seconds", type=int, default=15, help="recorded per hop")
    parser.add_argument("--systems", default="mesh,fused")
    parser.add_argument("--infermesh", default=".venv/bin/infermesh")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--format", choices=sorted(FORMATS), default="flamegraph",
                        help="py-spy's output format (raw: collapsed stacks, to sum by function)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    for system in args.systems.split(","):
        for path in record(system, system_args(args)):
            print(path, flush=True)
    return 0


def system_args(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with every setting `start_system` reads, at `bench.cpu_per_request`'s defaults
    where this command has no option of its own (REST only, no edge)."""
    defaults = system_parser().parse_args(["--infermesh", args.infermesh,
                                           "--ready-timeout", str(args.ready_timeout)])
    return argparse.Namespace(**{**vars(defaults), **vars(args), "cache_dir": DEFAULT_CACHE_DIR,
                                 "artifact_dir": None, "plain_port": 8500})


if __name__ == "__main__":
    sys.exit(main())
