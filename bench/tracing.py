"""What tracing costs the data plane: mlp throughput with tracing off, at the default sampling
ratio and at 1.0, exporting to the local span files and over OTLP, as ratios to "off" measured
in the same round. One more run turns the prediction log off as well, to show its cost (every
other run logs predictions, as `infermesh up` does).

    python -m bench.tracing [--duration 10] [--rounds 2] [--out bench/results/tracing-DATE.json]

The ratio is read at process start, so each run starts its own ``infermesh up`` (the runs of a
round go one after another on the same ports, each round starting one setup later than the
last). Besides req/s, each run reports the CPU time the mesh's processes (services and their
Postgres) spent per request served. The OTLP runs export over OTLP/HTTP to a sink
process on this machine that reads and discards each request (it shares the two cores, as a
collector next to the mesh would). Failed requests are traced at any ratio; the closed loop
sends only good ones, so what is measured is the sampling's cost.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.report import RatioReport, write_report
from bench.run_all import closed_loop, start_launcher
from deploy.localdeps import free_port
from services.mesh.infra.telemetry import DEFAULT_SAMPLE_RATIO

SINK = """
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def setups(sink: str) -> dict[str, dict[str, str]]:
    """Environment of each run: tracing off, then each exporter at two ratios."""
    otlp = {"INFERMESH_TRACE_DIR": "", "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    return {
        "off": {"INFERMESH_TRACE_DIR": ""},
        "off, no prediction log": {"INFERMESH_TRACE_DIR": "", "INFERMESH_ROUTER_DATABASE_URL": ""},
        "file default": {"INFERMESH_TRACE_SAMPLE_RATIO": str(DEFAULT_SAMPLE_RATIO)},
        "file 1.0": {"INFERMESH_TRACE_SAMPLE_RATIO": "1"},
        "otlp default": {**otlp, "INFERMESH_TRACE_SAMPLE_RATIO": str(DEFAULT_SAMPLE_RATIO)},
        "otlp 1.0": {**otlp, "INFERMESH_TRACE_SAMPLE_RATIO": "1"},
    }


def mesh_cpu_seconds(marker: str) -> float:
    """CPU seconds (user + system) used so far by the live processes whose environment
    carries `marker`: every service of one launcher, and the Postgres it writes to."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


@dataclass
class TracingReport(RatioReport):
    """req/s ratios to "off", and the CPU the mesh spent per request."""

    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    """CPU microseconds the mesh spent per request served, per round."""

    def cpu_ratios(self, setup: str) -> list[float]:
        return [c / o for c, o in zip(self.cpu_us[setup], self.cpu_us[self.baseline],
                                      strict=False) if o]

    def extra_headings(self) -> list[str]:
        return ["mesh CPU µs/request (median)", f"CPU ÷ {self.baseline}, per round"]

    def extra_cells(self, setup: str) -> list[str]:
        ratios = "—" if setup == self.baseline else ", ".join(
            f"{x:.2f}" for x in self.cpu_ratios(setup)
        )
        return [f"{statistics.median(self.cpu_us[setup]):,.0f}", ratios]

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "cpu_us_per_request": self.cpu_us,
                "cpu_ratios": {k: self.cpu_ratios(k) for k in self.runs if k != self.baseline}}


@contextmanager
def otlp_sink() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SINK, str(port)])
    try:
        time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", action="append", help="run only these setups (and off)")
    parser.add_argument("--out", type=Path, help="JSON path")
    parser.add_argument("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = datetime.now(UTC)
    report = TracingReport(shlex.join(["python", "-m", "bench.tracing", *(argv or sys.argv[1:])]),
                           started, baseline="off", label="tracing")
    out = args.out or Path("bench/results") / f"tracing-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    with otlp_sink() as sink:
        chosen = {k: v for k, v in setups(sink).items()
                  if k == "off" or not args.only or k in args.only}
        for round_ in range(args.rounds):
            # Each round starts one setup later: no setup always runs first (or last).
            order = list(chosen.items())
            order = order[round_ % len(order):] + order[:round_ % len(order)]
            for setup, env in order:
                with ExitStack() as stack:
                    name = f"tracing-{setup.replace(' ', '-').replace(',', '')}-{round_}"
                    marker = f"{name}-{started:%H%M%S}"
                    gateway = start_launcher(stack, args, logs, name, ports=(8000, 8200),
                                             extra_env={**env, "INFERMESH_BENCH_RUN": marker})
                    time.sleep(1.0)
                    cpu = mesh_cpu_seconds(marker)
                    result = closed_loop(gateway, "mlp", args)
                    cpu = mesh_cpu_seconds(marker) - cpu
                report.runs.setdefault(setup, []).append(result)
                served = result.rps * (args.duration + args.warmup)  # the warm-up ran too
                report.cpu_us.setdefault(setup, []).append(cpu / served * 1e6 if served else 0.0)
                print(f"[{round_}] {setup}: {result.summary_line()}, "
                      f"{report.cpu_us[setup][-1]:,.0f} CPU µs/request", flush=True)
    write_report(report, out, logs)
    print("median req/s ratios to off:", report.median_ratios())
    print("median CPU-per-request ratios to off:", {
        k: round(statistics.median(report.cpu_ratios(k)), 2) for k in report.runs if k != "off"
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
