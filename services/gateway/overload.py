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

The sojourn misses one kind of overload: a compute-bound model (the encoder) whose batcher
refuses most of a burst. Refusals come back in a millisecond and pull the mean sojourn down,
so the gateway forwarded every request of the burst, and each one cost the gateway, the
router and the batcher CPU, and two link round trips, before the batcher said no (on one
machine a small share beside the encoder's own batches, docs/PERFORMANCE.md; more where the
hops are apart). So the guard also **remembers the batcher's refusals**
(`remember`): a refusal by the latency model says when the refused request would have been
answered, by the prediction that refused it (`Overloaded.busy_for`). Until then, a request
for the same version, tenant and lane due at or after that deadline and before then would
be refused by the batcher too (its rows due first include all of those, by the same
prediction), so the gateway refuses it itself (`check_remembered`). A request due sooner is
forwarded (with earliest-deadline-first it may stand ahead of them), and so is everything
once the time has passed.
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


REMEMBERED_SPANS = 4
"""Refused spans of deadlines kept per (version, tenant, lane): one per deadline class of a
mixed load, about."""
REMEMBERED_KEYS = 64
"""Past this many (version, tenant, lane) keys of one model, a new one first forgets the
keys whose spans have all ended (a key is otherwise forgotten when it is next checked)."""


class _Refusals:
    """Spans [due, until) of deadlines the batcher would refuse now, for one key."""

    __slots__ = ("spans",)

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def add(self, due: float, until: float, now: float) -> None:
        spans = [s for s in self.spans if s[1] > now]
        for i, (start, end) in enumerate(spans):
            if start <= until and due <= end:  # overlapping: one span covers both
                spans[i] = (min(start, due), max(end, until))
                break
        else:
            spans.append((due, until))
            if len(spans) > REMEMBERED_SPANS:
                spans.remove(min(spans, key=lambda s: s[1]))  # the one that ends first
        self.spans = spans

    def ended(self, now: float) -> bool:
        return all(end <= now for _, end in self.spans)

    def until(self, deadline: float, now: float) -> float | None:
        for start, end in self.spans:
            if start <= deadline < end and now < end:
                return end
        return None


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
        self._refusals: dict[str, dict[tuple[str, str, str], _Refusals]] = {}
        """The batcher's refusals remembered: by model, then (version, tenant, lane)."""
        self._tickets = itertools.count()
        self.lag = 0.0
        """Seconds the gateway's loop runs late: how long a request waited before its
        handler ran, about."""
        self.refused = 0
        self.refused_remembered = 0
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

    def remember(self, model: str, key: tuple[str, str, str], deadline: float,
                 refusal: Overloaded) -> None:
        """Remember the batcher's `refusal` of a request for `model` due at `deadline`; `key`
        is its (version, tenant, lane). Only a refusal by the latency model says how long
        it holds (`Overloaded.busy_for`); a full queue or a displaced request does not."""
        if refusal.busy_for is None:
            return
        now = self._clock()
        until = now + refusal.busy_for
        if until <= deadline:
            return  # what it says covers no later deadline
        by_key = self._refusals.setdefault(model, {})
        remembered = by_key.get(key)
        if remembered is None:
            if len(by_key) >= REMEMBERED_KEYS:  # forget the tenants whose spans have ended
                for ended in [k for k, r in by_key.items() if r.ended(now)]:
                    del by_key[ended]
            remembered = by_key[key] = _Refusals()
        remembered.add(deadline, until, now)

    def remembers(self, model: str) -> bool:
        """Whether a batcher refusal is remembered for `model` (the cheap test first)."""
        return bool(self._refusals.get(model))

    def check_remembered(self, model: str, key: tuple[str, str, str], deadline: float) -> None:
        """Raise Overloaded (with Retry-After) if a remembered refusal covers a request for
        `model` with `key` due at `deadline` (see `remember`)."""
        by_key = self._refusals.get(model)
        if not by_key:
            return
        remembered = by_key.get(key)
        if remembered is None:
            return
        now = self._clock()
        until = remembered.until(deadline, now)
        if until is None:
            if remembered.ended(now):
                del by_key[key]
            return
        self.refused_remembered += 1
        raise Overloaded(
            f"{model}/{key[0]} cannot answer before the deadline: its batcher's backlog for "
            f"this deadline clears in {(until - now) * 1000:.0f} ms",
            retry_after=until - now,
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
