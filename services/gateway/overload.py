"""Overload control at the gateway: refuse at once what the mesh cannot answer in time.

The batcher refuses what its workers' queue cannot finish before the deadline (its latency
model). But when the hops themselves are the bottleneck — an overhead-bound model such as the
mlp, where a request costs more CPU in the gateway, router and batcher than in the model —
requests wait in socket buffers and event loops, where no queue counts them, and the batcher
finds its queue short. The gateway sees that whole wait, as two numbers:

- **the loop lag**: how late a short timer fires on the gateway's own loop (a decaying
  maximum). A request's bytes waited about that long before its handler ran, so the gateway
  dates its deadline from `now - lag` rather than from when it got round to reading it;
- **the sojourn** per model: the time from handler to answer of recent requests (an
  exponentially weighted mean, as CoDel watches the sojourn of its queue), or, when no answer
  came within `window` seconds while requests are in flight, the age of the oldest of them
  (a lower bound that keeps rising while the mesh is stuck).

A request that would be answered after its deadline if it took the current sojourn is refused
before it costs the mesh anything: `Overloaded` (503 + Retry-After, gRPC UNAVAILABLE). As the
refusals take load off, sojourns fall and requests are admitted again; with nothing in flight
nothing is refused. A version whose batching says `admission: off` is never refused here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable

from services.mesh.domain.errors import Overloaded

PROBE_INTERVAL = 0.005
"""Seconds between loop-lag probes (200 wake-ups a second, a few microseconds each)."""
LAG_DECAY = 0.8
"""Per probe, the lag estimate keeps this share of its previous value unless a later probe
was later still: a spike fades in ~10 probes (50 ms) once the loop keeps time again."""
SOJOURN_WEIGHT = 0.1
"""Weight of the newest answer in the sojourn mean: it follows a change within ~10 answers."""


class _Flow:
    """What the gateway knows of one model's requests: in flight, and how long answers take."""

    __slots__ = ("answered_at", "in_flight", "sojourn")

    def __init__(self) -> None:
        self.sojourn = 0.0
        self.answered_at = -float("inf")
        self.in_flight: dict[int, float] = {}
        """Start time by ticket, oldest first (dicts keep insertion order)."""


class OverloadGuard:
    """Per-model sojourns and the loop lag; `check` refuses what cannot be answered in time.

    `clock` is the gateway's (wall-clock seconds, like deadlines). `start_probe` runs the lag
    probe on the running loop; without it the lag stays 0 (unit tests set `lag` directly).
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.time, window: float = 0.25,
    ) -> None:
        self._clock = clock
        self._window = window
        self._flows: dict[str, _Flow] = {}
        self._tickets = itertools.count()
        self.lag = 0.0
        """Seconds the gateway's loop runs late: how long a request waited before its
        handler ran, about."""
        self.refused = 0
        self._probe: asyncio.Task[None] | None = None
        self.on_lag: Callable[[float], None] | None = None
        """Called with each new lag estimate (a gauge's `set`)."""

    def now(self) -> float:
        """When the request being handled arrived, about: the clock less the loop lag."""
        return self._clock() - self.lag

    def predicted(self, model: str) -> float:
        """Seconds from now until a request for `model` admitted now would be answered."""
        flow = self._flows.get(model)
        if flow is None or not flow.in_flight:
            return 0.0
        now = self._clock()
        if now - flow.answered_at <= self._window:
            return flow.sojourn
        return now - next(iter(flow.in_flight.values()))

    def check(self, model: str, deadline: float) -> None:
        """Raise Overloaded (with Retry-After) if `model`'s current sojourn passes `deadline`."""
        wait = self.predicted(model)
        if wait and self._clock() + wait > deadline:
            self.refused += 1
            raise Overloaded(
                f"{model} cannot answer before the deadline: answers take {wait * 1000:.0f} ms "
                f"now and {max(0.0, deadline - self._clock()) * 1000:.0f} ms are left",
                retry_after=wait,
            )

    def started(self, model: str) -> int:
        """Note a request forwarded for `model`; give its ticket to `finished`."""
        flow = self._flows.get(model)
        if flow is None:
            flow = self._flows[model] = _Flow()
        ticket = next(self._tickets)
        flow.in_flight[ticket] = self._clock()
        return ticket

    def finished(self, model: str, ticket: int) -> None:
        """Note that the request with `ticket` came back (an answer or an error)."""
        flow = self._flows[model]
        began = flow.in_flight.pop(ticket)
        now = self._clock()
        flow.sojourn += SOJOURN_WEIGHT * (now - began - flow.sojourn)
        flow.answered_at = now

    def start_probe(self, interval: float = PROBE_INTERVAL) -> None:
        """Measure the loop lag on the running loop until `aclose`."""
        self._probe = asyncio.get_running_loop().create_task(
            self._measure(interval), name="gateway-loop-lag")

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def _measure(self, interval: float) -> None:
        clock = time.monotonic
        while True:
            began = clock()
            await asyncio.sleep(interval)
            late = clock() - began - interval
            self.lag = max(late, self.lag * LAG_DECAY)
            if self.on_lag is not None:
                self.on_lag(self.lag)
