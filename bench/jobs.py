"""A 100,000-row async job on the mlp: its rows/s against the mesh's closed loop, and what it
does to realtime traffic beside it.

    python -m bench.jobs [--rows 100000] [--realtime-fraction 0.3] [--quick]

Issue 19's target: the job finishes at >= 0.8 x the mesh's closed-loop rows/s while realtime
traffic beside it keeps its p99. Starts its own ``infermesh up`` (gateway 8060, registry 8260,
control 8160), then:

1. capacity: a closed loop of one-row requests (wrk c=64, as ``bench.goodput`` measures it);
2. realtime alone (run in step 5): h2load open loop at ``--realtime-fraction`` of that capacity
   (one body, ``--connections`` HTTP/1.1 connections on an even grid) for
   ``--realtime-duration`` s, as fresh runs of ``--segment`` s each (``segmented_loop`` says
   why);
3. the job alone: ``POST /v1/jobs`` with every row inline (one OIP request of one row each),
   polled every ``--poll`` s until ``303 See Other``; rows/s from the POST to the 303 (and
   from the 202, without the upload). Inline bodies are bounded by the gateway's
   ``max_body_bytes`` (64 MiB); more rows than ``--max-body-mib`` holds are split over several
   jobs submitted together (100,000 mlp rows are ~30 MiB: one job);
4. realtime during the upload: the same open loop while the job's body goes up (POST to 202);
   that job is then cancelled;
5. ``--repeats`` times: realtime alone (as in step 2), then the job again with the same
   segmented open loop started once the job is accepted (started before the POST, h2load's
   clients would come out of the upload's stall bunched and stay bunched); and realtime alone
   once more at the end, so every run beside a job has one alone just before and just after.
   One run alone and another differed by 1.16-1.73x in p99 (a stall moves a whole run's p99),
   so the verdict compares the p99 of each 2 s window, pooled over every run alone and every
   run beside a job.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.h2load import Response
from bench.jobs_report import WINDOW_S, JobRun, JobsReport, Realtime
from bench.mesh import Mesh, OpenRun, call, ok, open_loop, sigterm_unwinds, start_mesh
from bench.payloads import infer_path, request_body
from bench.report import write_report
from bench.result import Percentiles
from bench.run_all import closed_loop

MODEL = "mlp"
SETTLE_S = 0.5
"""Seconds at the start of each open-loop segment left out: h2load's clients connecting."""


def job_bodies(rows: int, max_bytes: int) -> list[bytes]:
    """``rows`` one-row mlp requests (seeded), as few job bodies of at most ``max_bytes``."""
    data = np.round(np.random.default_rng(0).standard_normal((rows, 32)), 3).tolist()
    encoded = [orjson.dumps({"inputs": [{"name": "features", "datatype": "FP32",
                                         "shape": [1, 32], "data": row}]}) for row in data]
    bodies: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    head = b'{"model":"' + MODEL.encode() + b'","inputs":['
    for row in encoded:
        if chunk and (size + len(row) + len(head) + 2 > max_bytes or len(chunk) == 100_000):
            bodies.append(head + b",".join(chunk) + b"]}")
            chunk, size = [], 0
        chunk.append(row)
        size += len(row) + 1
    return [*bodies, head + b",".join(chunk) + b"]}"]


def submit_jobs(mesh: Mesh, bodies: list[bytes]) -> tuple[float, float, list[str]]:
    """POST every body: (epoch s before the first POST, after the last 202, each Location)."""
    began, locations = time.time(), []
    for body in bodies:
        answer = call(mesh.gateway, "POST", "/v1/jobs", raw=body, timeout=600.0)
        ok(answer, "POST /v1/jobs")
        locations.append(answer.headers["Location"])
    return began, time.time(), locations


def await_jobs(mesh: Mesh, submitted: tuple[float, float, list[str]], rows: int,
               poll_s: float) -> JobRun:  # fmt: skip
    """Poll each submitted job until its 303."""
    began, accepted, locations = submitted
    pending, statuses = set(locations), {}
    while pending:
        time.sleep(poll_s)
        for location in sorted(pending):
            answer = call(mesh.gateway, "GET", location)
            if answer.status == 303:
                pending.discard(location)
                statuses[location] = answer.body
            elif answer.status != 200 or answer.body["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {location}: {answer.status} {str(answer.body)[:500]}")
    done = time.time()
    failed = sum(int(s["progress"]["failed"]) for s in statuses.values())
    return JobRun(len(locations), rows, began, accepted, done, failed,
                  [_runner_seconds(s) for s in statuses.values()])  # fmt: skip


def run_jobs(mesh: Mesh, bodies: list[bytes], rows: int, poll_s: float) -> JobRun:
    """Submit every body, then poll each job until its 303."""
    return await_jobs(mesh, submit_jobs(mesh, bodies), rows, poll_s)


def _runner_seconds(status: dict[str, Any]) -> float:
    """finished_at − started_at of one job, as its status says (the runner's own time)."""
    started, finished = status.get("started_at"), status.get("finished_at")
    if not started or not finished:
        return float("nan")
    return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()


def realtime(run: OpenRun, start: float, end: float, rate: float, *,
             complete: bool = True) -> Realtime:  # fmt: skip
    """The open loop's requests sent in [start, end]: their 2xx latencies and failures;
    `complete`: whether the loop lasted as long as what it was measured beside."""
    inside: list[Response] = [r for r in run.responses if start <= r.start_s <= end]
    ok_latencies = [r.latency_s for r in inside if 200 <= r.status < 300]
    return Realtime(rate, len(inside), len(inside) - len(ok_latencies) + run.unanswered,
                    Percentiles.of(ok_latencies), end - start,
                    window_p99s(inside, start, rate), complete)  # fmt: skip


def window_p99s(responses: list[Response], start: float, rate: float) -> list[float]:
    """The p99 ms of the 2xx answers sent in each `WINDOW_S` window from `start`; a window
    with under half the requests the rate sends in one (a segment's edge, its settling part
    left out) is left out too."""
    windows: dict[int, list[float]] = {}
    for r in responses:
        if 200 <= r.status < 300:
            windows.setdefault(int((r.start_s - start) // WINDOW_S), []).append(r.latency_s)
    least = rate * WINDOW_S / 2
    return [Percentiles.of(latencies).p99 for _, latencies in sorted(windows.items())
            if len(latencies) >= least]


def measure(mesh: Mesh, args: argparse.Namespace, report: JobsReport, logs: Path) -> None:
    capacity = closed_loop(mesh.gateway, MODEL, argparse.Namespace(
        duration=args.capacity_duration, warmup=1.0))  # fmt: skip
    report.capacity_rows_per_s = capacity.rows_per_s
    print(f"capacity: {capacity.summary_line()}", flush=True)
    rate, url = args.realtime_fraction * capacity.rows_per_s, mesh.gateway + infer_path(MODEL)
    body = [request_body(MODEL, 1)]
    bodies = job_bodies(args.rows, args.max_body_mib << 20)
    report.job_alone = run_jobs(mesh, bodies, args.rows, args.poll)
    print(f"job alone: {report.job_alone.rows_per_s:,.0f} rows/s", flush=True)
    beside_s = 1.5 * report.job_alone.seconds / (1 - args.realtime_fraction) + 2
    upload_s = report.job_alone.accepted - report.job_alone.began
    report.realtime_upload = realtime_during_upload(mesh, bodies, upload_s, args, url, body, rate,
                                                    logs)  # fmt: skip
    for turn in range(args.repeats):
        report.realtime_alone.append(alone_loop(url, body, rate, args, logs, turn))
        job, beside = job_beside(mesh, bodies, url, body, rate, args, logs, turn, beside_s)
        report.job_beside.append(job)
        report.realtime_beside.append(beside)
        print(f"job beside realtime ({turn + 1}/{args.repeats}): {job.rows_per_s:,.0f} rows/s",
              flush=True)
    report.realtime_alone.append(alone_loop(url, body, rate, args, logs, args.repeats))


def alone_loop(url: str, body: list[bytes], rate: float, args: argparse.Namespace, logs: Path,
               turn: int) -> Realtime:  # fmt: skip
    """Realtime alone for ``--realtime-duration`` s."""
    run = segmented_loop(url, body, rate, args, logs, f"h2load-alone-{turn}",
                         args.realtime_duration)
    return realtime(run, min(r.start_s for r in run.responses),
                    max(r.start_s for r in run.responses), rate)


def job_beside(mesh: Mesh, bodies: list[bytes], url: str, body: list[bytes], rate: float,
               args: argparse.Namespace, logs: Path, turn: int,
               most_s: float) -> tuple[JobRun, Realtime]:  # fmt: skip
    """The job with the segmented open loop beside it, from its 202 to its 303."""
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        # The jobs are accepted before the open loop starts: a gateway busy with a large
        # upload stalls every client, and h2load's clients come out of a stall bunched and
        # stay so for the rest of their run (a 150 ms SIGSTOP of the gateway alone doubled
        # the p50 for good), which would charge the upload to the whole window beside the job.
        submitted = submit_jobs(mesh, bodies)
        loop = pool.submit(segmented_loop, url, body, rate, args, logs,
                           f"h2load-beside-{turn}", most_s, done)  # fmt: skip
        job = await_jobs(mesh, submitted, args.rows, args.poll)
        done.set()
        beside = loop.result()
    first = min(r.start_s for r in beside.responses)
    last = max(r.start_s for r in beside.responses)
    return job, realtime(beside, first, min(job.done, last), rate, complete=last >= job.done)


def segmented_loop(url: str, body: list[bytes], rate: float, args: argparse.Namespace,
                   logs: Path, name: str, seconds: float,
                   stop: threading.Event | None = None) -> OpenRun:  # fmt: skip
    """Fresh open loops of ``--segment`` s back to back for ``seconds`` (or until ``stop``),
    the first ``SETTLE_S`` of each left out. h2load's clients drift into bunches over a long
    run (p50 5 -> 8 ms over 20 s alone, even with 128 connections), so one long run beside a
    job against a shorter one alone measured the drift; in segments both sides see the same."""
    responses: list[Response] = []
    cpu, unanswered, began = 0.0, 0, time.time()
    part = 0
    while time.time() - began < seconds and not (stop is not None and stop.is_set()):
        run = open_loop(url, body, rate=rate, connections=args.connections, logs=logs,
                        seconds=args.segment + SETTLE_S, name=f"{name}-{part}")  # fmt: skip
        first = min((r.start_s for r in run.responses), default=0.0)
        responses += [r for r in run.responses if r.start_s >= first + SETTLE_S]
        cpu, unanswered, part = cpu + run.client_cpu_s, unanswered + run.unanswered, part + 1
    return OpenRun(responses, cpu, unanswered)


def realtime_during_upload(mesh: Mesh, bodies: list[bytes], upload_s: float,
                           args: argparse.Namespace, url: str, body: list[bytes], rate: float,
                           logs: Path) -> Realtime:  # fmt: skip
    """The open loop's requests sent while the jobs' bodies go up (POST to the last 202),
    the upload having taken ``upload_s`` alone; the jobs are cancelled once accepted."""
    with ThreadPoolExecutor(1) as pool:
        loop = pool.submit(open_loop, url, body, rate=rate, connections=args.connections,
                           seconds=upload_s + 3, logs=logs, name="h2load-upload")  # fmt: skip
        time.sleep(1.0)  # the open loop is under way before the upload
        began, accepted, locations = submit_jobs(mesh, bodies)
        for location in locations:
            call(mesh.gateway, "DELETE", location)
        run = loop.result()
    return realtime(run, began, accepted, rate)

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--rows", type=int, default=100_000, help="rows of the job")
    add("--realtime-fraction", type=float, default=0.3, help="of the capacity, beside the job")
    add("--realtime-duration", type=float, default=16.0, help="s of each realtime run alone")
    add("--repeats", type=int, default=3, help="runs of the job beside realtime, each after "
        "one of realtime alone")
    add("--capacity-duration", type=float, default=10.0, help="closed-loop seconds")
    add("--connections", type=int, default=128, help="realtime open-loop connections (many, so "
        "each sends seldom: an HTTP/1.1 client late behind one slow answer shifts its phase "
        "for good, and with 32 the clients drifted into bunches within seconds)")
    add("--poll", type=float, default=0.25, help="s between GETs of a job")
    add("--segment", type=float, default=8.0, help="s of each fresh realtime open loop")
    add("--max-body-mib", type=int, default=60, help="largest job body (gateway: 64 MiB)")
    add("--quick", action="store_true", help="smoke run: 8,000 rows (so the job beside realtime "
        "outlasts the open loop's start), 3 s runs")
    add("--ports", type=int, nargs=2, default=(8060, 8260), metavar=("GATEWAY", "REGISTRY"))
    add("--out", type=Path, help="JSON path (default bench/results/jobs-DATE.json)")
    add("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    add("--ready-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.realtime_duration, args.capacity_duration = 8_000, 3.0, 3.0
        args.repeats = 1
        args.segment = 3.0
        args.connections = 4
    for name in ("rows", "realtime_duration", "capacity_duration", "connections", "poll", "segment",
                 "max_body_mib", "repeats"):  # fmt: skip
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 < args.realtime_fraction < 1:
        parser.error("--realtime-fraction must be within (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = datetime.now(UTC)
    report = JobsReport(shlex.join(["python", "-m", "bench.jobs", *argv]), started,
                        realtime_fraction=args.realtime_fraction)  # fmt: skip
    out = args.out or Path("bench/results") / f"jobs-{started:%Y-%m-%dT%H%M%SZ}.json"
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    with sigterm_unwinds(), ExitStack() as stack:
        measure(start_mesh(stack, args, logs, tuple(args.ports)), args, report, logs)
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
