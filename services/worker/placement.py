"""Placement: which versions a worker keeps loaded within its memory budget.

Pure bookkeeping with an injected clock; the worker core feeds it (a version loaded with its
measured footprint, a request, a batch starting and ending, an eviction) and asks it two
questions: does a version fit without evicting anything (the eager loads at start), and which
versions to evict to make room for one (a load on demand).

The policy:

- **Budget**: resident bytes stay at or under the budget; a footprint is only known after a
  load, so a load may overshoot, by at most :data:`TOLERANCE` (5 %) of the budget, before the
  core evicts again. A version alone bigger than the budget still loads when nothing else is
  resident: the worker exists to serve it.
- **Victims**: lowest :func:`keep_score` first (least recently used, weighted by what its
  eviction would cost: load seconds × recent request rate), never a version with a batch
  queued or running here (`in_flight`).
- **Thrash**: a version requested again within `thrash_window` seconds of its eviction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[str, str]

TOLERANCE = 0.05
"""How far past the budget resident bytes may go (a fraction of it) before a load waits."""
DEFAULT_BUDGET_FRACTION = 0.5
"""The share of the machine's memory a worker's default budget takes."""
RATE_HALF_LIFE = 30.0
"""Seconds over which a version's request rate forgets half its past."""


def keep_score(*, load_seconds: float, request_rate: float, idle_seconds: float) -> float:
    """What keeping a loaded version is worth; the lowest is evicted first.

    `load_seconds × request_rate` is the load time an eviction would cost per second of its
    traffic (a version loaded in 2 s and asked 5 times a second is worth far more than one
    loaded in 0.1 s and asked once a minute); dividing by `1 + idle_seconds` makes it
    least-recently-used among equals and lets a once-hot version age out.
    """
    return load_seconds * request_rate / (1.0 + max(0.0, idle_seconds))


def default_budget(memory_total: int, fraction: float = DEFAULT_BUDGET_FRACTION) -> int:
    """The budget of a worker that names none: `fraction` of the machine's memory."""
    return int(memory_total * fraction)


@dataclass(slots=True)
class _Usage:
    """When a version was last asked for and its decayed request rate (requests/s)."""

    last_used: float
    rate: float = 0.0
    rate_at: float = 0.0

    def rate_now(self, now: float) -> float:
        return self.rate * _decay(now - self.rate_at)

    def add(self, now: float) -> None:
        self.rate = self.rate_now(now) + math.log(2) / RATE_HALF_LIFE
        self.rate_at = self.last_used = now


def _decay(elapsed: float) -> float:
    return float(0.5 ** (max(0.0, elapsed) / RATE_HALF_LIFE))


@dataclass(frozen=True, slots=True)
class Resident:
    """A loaded version: the bytes it was measured to hold, the seconds its load took."""

    footprint: int
    load_seconds: float


class Placement:
    """The resident versions of one worker against its budget."""

    def __init__(
        self, budget: int, *, thrash_window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget <= 0:
            raise ValueError(f"memory budget must be positive bytes, not {budget}")
        self.budget = budget
        self.thrash_window = thrash_window
        self._clock = clock
        self.resident: dict[Key, Resident] = {}
        self._footprints: dict[Key, int] = {}  # last measured, kept across evictions
        self._usage: dict[Key, _Usage] = {}
        self._in_flight: dict[Key, int] = {}
        self._evicted_at: dict[Key, float] = {}
        self.peak = 0

    @property
    def limit(self) -> int:
        """The most resident bytes may reach: the budget plus its tolerance."""
        return int(self.budget * (1 + TOLERANCE))

    @property
    def resident_bytes(self) -> int:
        return sum(r.footprint for r in self.resident.values())

    def requested(self, key: Key) -> bool:
        """Note a request (a batch) for `key`; True when it is a thrash: the first request
        for a version evicted less than `thrash_window` seconds ago."""
        now = self._clock()
        usage = self._usage.setdefault(key, _Usage(now))
        usage.add(now)
        evicted = self._evicted_at.pop(key, None)
        return evicted is not None and now - evicted <= self.thrash_window

    def started(self, key: Key) -> None:
        """A batch of `key` is queued or running here: `key` may not be evicted."""
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def finished(self, key: Key) -> None:
        """A batch of `key` is done (or dropped)."""
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    def busy(self, key: Key) -> bool:
        return key in self._in_flight

    def loaded(self, key: Key, *, footprint: int, load_seconds: float) -> None:
        """`key` is resident, holding `footprint` bytes (measured), loaded in `load_seconds`."""
        self.resident[key] = Resident(footprint, load_seconds)
        self._footprints[key] = footprint
        self._usage.setdefault(key, _Usage(self._clock()))
        self.peak = max(self.peak, self.resident_bytes)

    def evicted(self, key: Key) -> None:
        """`key` was unloaded to make room; a request for it soon after is a thrash."""
        if self.resident.pop(key, None) is not None:
            self._evicted_at[key] = self._clock()

    def forget(self, key: Key) -> None:
        """`key` is no longer resident for another reason (closing, a failure)."""
        self.resident.pop(key, None)

    def estimate(self, key: Key, *, artifact_bytes: int) -> int:
        """Bytes a load of `key` will likely take: its last measured footprint, else the
        largest measured for its model, else its artifact's size (a floor: the weights)."""
        known = self._footprints.get(key)
        if known is not None:
            return known
        same_model = [b for (model, _), b in self._footprints.items() if model == key[0]]
        return max([artifact_bytes, *same_model])

    def fits(self, need: int) -> bool:
        """Whether `need` more bytes fit in the budget without evicting anything."""
        return not self.resident or self.resident_bytes + need <= self.budget

    def victims(self, need: int, *, keep: Key) -> list[Key] | None:
        """The versions to evict, lowest :func:`keep_score` first, so that `need` more bytes
        fit; [] when they fit already; None when what may be evicted (nothing in flight,
        not `keep`) cannot make enough room: the load waits for batches to finish."""
        used = sum(r.footprint for k, r in self.resident.items() if k != keep)
        if used + need <= self.budget:
            return []
        now = self._clock()
        ranked = sorted(
            (k for k in self.resident if k != keep and not self.busy(k)),
            key=lambda k: self._rank(k, now),
        )
        chosen: list[Key] = []
        for key in ranked:
            chosen.append(key)
            used -= self.resident[key].footprint
            if used + need <= self.budget:
                return chosen
        if used + need <= self.limit or used == 0:
            return chosen
        return None

    def _rank(self, key: Key, now: float) -> tuple[float, float]:
        usage = self._usage.get(key) or _Usage(0.0)
        score = keep_score(load_seconds=self.resident[key].load_seconds,
                           request_rate=usage.rate_now(now), idle_seconds=now - usage.last_used)
        return score, usage.last_used
