"""Open-loop load with ``h2load`` (nghttp2's C client): arrival schedules, runs, per-request logs.

Every client is one HTTP/1.1 connection that sends at fixed offsets from its own start, read
from a timing script (``--timing-script-file``); h2load creates the clients ``per_tick`` at a
time every ``tick_ms`` (``-r``/``--rate-period``), so their phases are spread evenly over the
first ``spread_ms`` of each period. With ``spread_ms == period_ms`` the arrivals form an even
grid at the asked rate (uniform); with a shorter spread they come in on-phases (bursty on/off).

HTTP/1.1 carries one request at a time per connection, so a client whose previous answer is
still out sends late (and h2load times it from the late send). A period of at least twice the
longest deadline keeps that from happening while the server honours deadlines; the offered
rate is measured from the log either way.

``--log-file`` writes one tab-separated line per request: start (µs since the epoch), status
(-1 for a failed stream) and µs until the end of the response.
"""

from __future__ import annotations

import math
import re
import resource
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

H2LOAD = "h2load"
MAX_TICK_MS = 10


class Response(NamedTuple):
    """One request as h2load logged it: when it was sent, its status, how long it took."""

    start_s: float
    """Seconds since the epoch."""
    status: int
    """HTTP status; -1 when the stream failed (connection reset, refused)."""
    latency_s: float


def parse_log(text: str) -> list[Response]:
    """Parse an h2load ``--log-file`` (tab-separated start µs, status, duration µs)."""
    responses = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        start_us, status, duration_us = fields[:3]
        responses.append(Response(int(start_us) / 1e6, int(status), int(duration_us) / 1e6))
    return responses


@dataclass(frozen=True)
class Arrivals:
    """A schedule h2load can play: ``clients`` connections, each sending once per ``period_ms``
    for ``cycles`` periods, started ``per_tick`` every ``tick_ms`` (so over ``spread_ms``)."""

    clients: int
    per_tick: int
    tick_ms: int
    period_ms: int
    cycles: int

    @classmethod
    def plan(cls, rate: float, *, period_ms: int, duty: float, seconds: float) -> Arrivals:
        """Arrivals at ``rate`` req/s on average, all of them in (about) the first ``duty`` of
        each period of (about) ``period_ms``, for at least ``seconds``."""
        clients = max(1, round(rate * period_ms / 1000))
        period_ms = round(clients / rate * 1000)  # the mean rate exactly, with whole clients
        per_ms = rate / duty / 1000
        per_tick, tick_ms = _ticks(per_ms)
        if per_tick > clients:  # h2load refuses -r > -c: start them all in one tick
            per_tick, tick_ms = clients, max(1, round(clients / per_ms))
        cycles = max(1, -(-round(seconds * 1000) // period_ms))
        return cls(clients, per_tick, tick_ms, period_ms, cycles)

    @property
    def spread_ms(self) -> int:
        """How long h2load takes to start every client: the on-phase of each period."""
        return -(-self.clients // self.per_tick) * self.tick_ms

    @property
    def rate(self) -> float:
        """The mean rate this schedule offers, req/s."""
        return self.clients / (self.period_ms / 1000)

    def timing_script(self, url: str) -> str:
        """The ``--timing-script-file`` every client plays: one send per period."""
        return "".join(f"{cycle * self.period_ms}.0\t{url}\n" for cycle in range(self.cycles))

    def command(
        self, script: Path, body: Path, log: Path, headers: Sequence[str], *, idle_s: int
    ) -> list[str]:
        """The h2load command line (one thread, HTTP/1.1, one request in flight per client).
        A connection silent for ``idle_s`` seconds is given up (a hung server ends the run)."""
        command = [H2LOAD, "--h1", "-c", str(self.clients), "-n", str(self.cycles),
                   "-r", str(self.per_tick), "--rate-period", f"{self.tick_ms}ms",
                   "--timing-script-file", str(script), "-d", str(body),
                   "-N", f"{idle_s}s", "--log-file", str(log)]  # fmt: skip
        for header in headers:
            command += ["-H", header]
        return command


@dataclass(frozen=True)
class StreamArrivals:
    """An open-loop schedule over HTTP/2 (h2c through the edge): ``clients`` connections, each
    playing the same script of ``offsets_ms`` with up to ``streams`` requests in flight, so a
    slow answer never delays the next send (no coordinated omission) and a few connections
    carry any rate. Every client sends at the same offsets, so arrivals come ``clients`` at a
    time, every few milliseconds: fine-grained next to the deadlines measured (≥ 50 ms).

    The HTTP/1.1 schedule (`Arrivals`) needs one connection per arrival slot, thousands at 2x
    an mlp's capacity: the gateway then spends its loop on connections, and h2load itself fell
    short of the asked rate (3,400 of 7,100 req/s sent, 2026-12-07)."""

    clients: int
    streams: int
    offsets_ms: tuple[float, ...]

    @classmethod
    def plan(
        cls, rate: float, *, period_ms: int, duty: float, seconds: float, clients: int = 8,
        streams: int = 1024,
    ) -> StreamArrivals:
        """``rate`` req/s on average over all clients, each period's requests in (about) its
        first ``duty``, for at least ``seconds``."""
        per_client = max(1, round(rate * period_ms / 1000 / clients))  # per client and period
        spacing = duty * period_ms / per_client
        cycles = max(1, math.ceil(seconds * 1000 / period_ms))
        offsets = tuple(cycle * period_ms + k * spacing
                        for cycle in range(cycles) for k in range(per_client))  # fmt: skip
        return cls(clients, streams, offsets)

    @property
    def rate(self) -> float:
        """The mean rate this schedule offers, req/s."""
        span_s = (self.offsets_ms[-1] + 1e-3) / 1000 if len(self.offsets_ms) > 1 else 1.0
        return self.clients * len(self.offsets_ms) / max(span_s, 1e-3)

    def timing_script(self, url: str) -> str:
        """The ``--timing-script-file`` every client plays."""
        return "".join(f"{offset:.3f}\t{url}\n" for offset in self.offsets_ms)

    def command(
        self, script: Path, body: Path, log: Path, headers: Sequence[str], *, idle_s: int
    ) -> list[str]:
        """The h2load command line (one thread, h2c prior knowledge)."""
        command = [H2LOAD, "-c", str(self.clients), "-m", str(self.streams),
                   "-n", str(self.clients * len(self.offsets_ms)),
                   "--timing-script-file", str(script), "-d", str(body),
                   "-N", f"{idle_s}s", "--log-file", str(log)]  # fmt: skip
        for header in headers:
            command += ["-H", header]
        return command


def started_requests(summary: str) -> int:
    """How many requests h2load started, from its summary (``requests: N total, S started``):
    more than its log holds when some got no answer before the idle timeout (``-N``)."""
    found = re.search(r"requests: \d+ total, (\d+) started", summary)
    if found is None:
        raise RuntimeError(f"no request counts in h2load's summary:\n{summary[-2000:]}")
    return int(found.group(1))


def _ticks(per_ms: float) -> tuple[int, int]:
    """Clients per tick and the tick (whole ms, as h2load's --rate-period takes), at least
    ``per_ms`` clients per ms but as close as can be: a little faster leaves a short idle gap
    at the end of the on-phase, instead of overrunning it. Ticks stay short (at most 10 ms)
    unless the rate is below one per 10 ms, then one client per tick."""
    longest = max(MAX_TICK_MS, math.ceil(1 / per_ms))
    candidates = ((math.ceil(per_ms * tick), tick) for tick in range(1, longest + 1))
    return min(candidates, key=lambda pair: (pair[0] / pair[1], pair[1]))


def run_together(commands: Sequence[list[str]], outputs: Sequence[Path], timeout: float) -> float:
    """Start every command at once, wait for all, and return the CPU seconds (user + system)
    they used. Raises if one fails or runs past ``timeout``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    processes = []
    for command, output in zip(commands, outputs, strict=True):
        with output.open("wb") as sink:
            processes.append(subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT))
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for process, output in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"h2load exited {process.returncode}: {output.read_text()[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
