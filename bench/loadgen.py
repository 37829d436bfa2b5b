"""Python load generator for the OIP v2 ``infer`` endpoint: closed loop and open (Poisson) loop.

Closed loop: ``concurrency`` workers each send the next request as soon as the last one answers.
Open loop: arrivals follow a Poisson process at ``rate`` per second, scheduled against absolute
times so a slow response never delays the next arrival. Each arrival runs as its own task; the
client reports its *send lag* (actual start − scheduled time) so a CPU-starved client shows up
in the numbers instead of silently lowering the offered load. Requests go through
`bench.rawhttp.RawClient` (pre-encoded request, keep-alive) so the client's own CPU stays
small. Open-loop latency is measured from the actual send; add the send lag to get latency
from the intended arrival time.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model mlp --mode closed --concurrency 64
    python -m bench.loadgen --url http://127.0.0.1:8000 --model mlp --mode open --rate 2000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from time import perf_counter, process_time

import orjson
import uvloop
from yarl import URL

from bench.payloads import infer_path, request_body
from bench.rawhttp import RawClient
from bench.result import ErrorLog, LoadResult, Percentiles

REQUEST_TIMEOUT_S = 30.0
TIMER_RESOLUTION_S = 0.001
"""uvloop rounds timers to whole milliseconds; shorter sleeps would spin and steal server CPU."""
LAUNCH_BURST = 64
"""Yield to the loop after this many back-to-back arrivals so started requests get to run."""

_ArrivalFn = Callable[[float], Coroutine[None, None, None]]


@dataclass
class _Window:
    """Collects outcomes of requests that belong to the measured window."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    send_lags: list[float] = field(default_factory=list)
    errors: ErrorLog = field(default_factory=ErrorLog)
    requests: int = 0

    def record(self, sent: float, done: float, error: str | None) -> None:
        """Count one finished request; ``error`` is ``None`` on success."""
        self.requests += 1
        if error is None:
            self.latencies.append(done - sent)
        else:
            self.errors.add(error)

    def result(self, *, tool: str, mode: str, model: str, url: str, rows: int) -> LoadResult:
        """Summarise the window as a :class:`LoadResult`."""
        duration = self.end - self.start
        return LoadResult(
            tool=tool,
            mode=mode,
            model=model,
            url=url,
            duration_s=duration,
            requests=self.requests,
            errors=self.errors.count,
            rps=len(self.latencies) / duration,
            latency=Percentiles.of(self.latencies),
            rows_per_request=rows,
            send_lag=Percentiles.of(self.send_lags) if mode == "open" else None,
            error_samples=list(self.errors.samples),
        )


async def _send(client: RawClient) -> str | None:
    """POST one request; return ``None`` on HTTP 200, else a short error message."""
    try:
        status, answer = await client.post()
        if status != 200:
            return f"HTTP {status}: {answer[:200].decode(errors='replace')}"
    except Exception as exc:  # any failure is a failed request, never a crashed run
        return f"{type(exc).__name__}: {exc}"
    return None


def _target(url: str, model: str) -> URL:
    return URL(url.rstrip("/") + infer_path(model), encoded=True)


async def run_closed(
    url: str,
    model: str,
    *,
    concurrency: int = 64,
    duration: float = 10.0,
    warmup: float = 2.0,
    rows: int = 1,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    """Run ``concurrency`` back-to-back senders; measure requests sent and answered in-window."""
    body, target = request_body(model, rows), _target(url, model)
    cpu_at, start = process_time(), perf_counter() + warmup
    window = _Window(start=start, end=start + duration)

    async def sender() -> None:
        while (sent := perf_counter()) < window.end:
            error = await _send(client)
            done = perf_counter()
            if sent >= window.start and done <= window.end:
                window.record(sent, done, error)

    client = RawClient(str(target), body, headers=headers)
    try:
        await asyncio.gather(*(sender() for _ in range(concurrency)))
    finally:
        client.close()
    result = window.result(tool="loadgen", mode="closed", model=model, url=url, rows=rows)
    result.client_cpu = (process_time() - cpu_at) / (perf_counter() - start + warmup)
    result.concurrency = concurrency
    return result


async def run_open(
    url: str,
    model: str,
    *,
    rate: float,
    duration: float = 10.0,
    warmup: float = 2.0,
    rows: int = 1,
    max_outstanding: int = 1024,
    seed: int = 0,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    """Offer Poisson arrivals at ``rate``/s; arrivals beyond ``max_outstanding`` are dropped.

    Every arrival scheduled inside the window is counted, including ones answered after it
    closes; drops count as errors.
    """
    body, target = request_body(model, rows), _target(url, model)
    cpu_at, start = process_time(), perf_counter() + warmup
    window = _Window(start=start, end=start + duration)

    async def arrival(scheduled: float) -> None:
        sent = perf_counter()
        error = await _send(client)
        if scheduled >= window.start:
            window.send_lags.append(sent - scheduled)
            window.record(sent, perf_counter(), error)

    client = RawClient(str(target), body, headers=headers)
    try:
        tasks = await _schedule(arrival, window, rate=rate, cap=max_outstanding, seed=seed)
        if tasks:
            # Answers still missing this long after the window are counted as failures.
            _, stuck = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5.0)
            for task in stuck:
                task.cancel()
                window.record(0.0, 0.0, "no answer by the end of the run")
    finally:
        client.close()
    result = window.result(tool="loadgen", mode="open", model=model, url=url, rows=rows)
    result.client_cpu = (process_time() - cpu_at) / (perf_counter() - start + warmup)
    result.offered_rate = rate
    return result


async def _schedule(
    arrival: _ArrivalFn, window: _Window, *, rate: float, cap: int, seed: int
) -> set[asyncio.Task[None]]:
    """Launch arrivals until the window closes; return the tasks still outstanding."""
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()
    next_at = perf_counter()
    launched = 0
    while next_at < window.end:
        delay = next_at - perf_counter()
        if delay > 0 or launched >= LAUNCH_BURST:
            await asyncio.sleep(max(delay, TIMER_RESOLUTION_S) if delay > 0 else 0)
            launched = 0
            continue
        if len(tasks) >= cap:
            if next_at >= window.start:
                window.record(next_at, next_at, f"dropped: {cap} requests outstanding")
        else:
            task = asyncio.create_task(arrival(next_at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        launched += 1
        next_at += rng.expovariate(rate)
    return tasks


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default="mlp", help="demo model name (mlp, encoder)")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--concurrency", type=int, default=64, help="closed loop: senders")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: arrivals per second")
    parser.add_argument("--max-outstanding", type=int, default=1024, help="open loop: drop cap")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--seed", type=int, default=0, help="open loop: arrival RNG seed")
    parser.add_argument("--json", action="store_true", help="print a JSON object on stdout")
    return parser


async def _run(args: argparse.Namespace) -> LoadResult:
    common = {"duration": args.duration, "warmup": args.warmup, "rows": args.rows}
    if args.mode == "closed":
        return await run_closed(args.url, args.model, concurrency=args.concurrency, **common)
    return await run_open(
        args.url,
        args.model,
        rate=args.rate,
        max_outstanding=args.max_outstanding,
        seed=args.seed,
        **common,
    )


def main(argv: list[str] | None = None) -> int:
    """Run one load test from the command line; exit 1 if every request failed."""
    args = _parser().parse_args(argv)
    result = uvloop.run(_run(args))
    if args.json:
        print(result.summary_line(), file=sys.stderr)
        sys.stdout.buffer.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(result.summary_line())
    return 1 if result.requests and result.errors == result.requests else 0


if __name__ == "__main__":
    sys.exit(main())
