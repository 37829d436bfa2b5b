"""The batcher's books on its workers: batches in flight, outstanding rows, suspects.

Pure bookkeeping fed by the core (no I/O, the clock injected): which worker gets the next
batch (among those with a free pipeline slot, workers that just failed a batch last: one that
has the version loaded before one that would load it first, then the fewest outstanding rows),
when a worker's running batch is expected to end, and when a batch
called on a busy worker actually started executing (the end of the one before it), so the
latency model is fed execution time, not time spent queued in the worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from services.mesh.domain.hops import WorkerHandle

W = TypeVar("W", bound=WorkerHandle)

SUSPECT_SECONDS = 1.0
"""How long a worker that failed a batch (Unavailable) is passed over while others serve."""


class WorkerBook:
    """Batches in flight per worker key, in the order they were called."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._batches: dict[str, deque[int]] = {}
        self._bulk: dict[str, int] = {}
        """Per worker, its batches in flight that carry bulk rows only."""
        self._running_since: dict[str, float] = {}
        self._free_at: dict[str, float] = {}
        self._suspect_until: dict[str, float] = {}
        self._launches = 0
        self._last_launch: dict[str, int] = {}
        """Per worker, the number of the last batch launched on it: ties go to the worker
        used least recently, so idle workers take turns (each keeps its latency model warm,
        and a worker that joins gets batches at light load too)."""

    def inflight(self, key: str) -> int:
        """Batches called on the worker and not yet answered."""
        batches = self._batches.get(key)
        return len(batches) if batches else 0

    def bulk_only(self, key: str) -> bool:
        """Whether the worker is busy with bulk batches and nothing else."""
        return 0 < self.inflight(key) == self._bulk.get(key, 0)

    def outstanding(self, key: str) -> int:
        """Rows in the worker's batches in flight."""
        batches = self._batches.get(key)
        return sum(batches) if batches else 0

    def running_rows(self, key: str) -> int:
        batches = self._batches.get(key)
        return batches[0] if batches else 0

    def pick(
        self, candidates: Sequence[W], depth: int, *, exclude: str | None = None,
        resident: Callable[[W], bool] | None = None,
    ) -> W | None:
        """The worker for the next batch: a free pipeline slot (depth < 1: any), not
        suspect unless all are, the version `resident` on it (a load takes seconds, a busy
        worker's queue milliseconds), the fewest outstanding rows; among equals, the one used
        least recently.

        A worker that would load the version gets the batch only while every one that has it
        loaded has no free slot: that is the version spreading under load, not a thrash."""
        now = self._clock()
        usable = [w for w in candidates if w.key != exclude
                  and (depth < 1 or self.inflight(w.key) < depth)]
        trusted = [w for w in usable if self._suspect_until.get(w.key, 0.0) <= now]
        pool = trusted or usable
        if not pool:
            return None
        return min(pool, key=lambda w: (resident is not None and not resident(w),
                                        self.outstanding(w.key), self.inflight(w.key),
                                        self._last_launch.get(w.key, -1)))

    def launched(self, key: str, rows: int, *, bulk: bool = False) -> None:
        self._launches += 1
        if bulk:
            self._bulk[key] = self._bulk.get(key, 0) + 1
        self._last_launch[key] = self._launches
        batches = self._batches.setdefault(key, deque())
        if not batches:
            self._running_since[key] = self._clock()
        batches.append(rows)

    def started(self, key: str, called: float) -> float:
        """When a batch called at `called` began executing: after the worker's previous one."""
        return max(called, self._free_at.get(key, called))

    def finished(self, key: str, rows: int, *, bulk: bool = False) -> float:
        """Book a batch's end; returns the time."""
        now = self._clock()
        if bulk and self._bulk.get(key, 0) > 0:
            self._bulk[key] -= 1
        batches = self._batches.get(key)
        if batches:
            if rows in batches:
                batches.remove(rows)
            else:
                batches.popleft()
        self._free_at[key] = now
        if batches:
            self._running_since[key] = now  # the next one starts now
        else:
            self._batches.pop(key, None)
            self._running_since.pop(key, None)
        return now

    def running_for(self, key: str) -> float:
        """Seconds the worker's running batch has run so far (0 when it runs none)."""
        since = self._running_since.get(key)
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def free_in(self, key: str, seconds: float | None) -> float:
        """Seconds until the worker's running batch ends, if it takes `seconds` in all."""
        since = self._running_since.get(key)
        if since is None:
            return 0.0
        return max(0.0, since + (seconds or 0.0) - self._clock())

    def suspect(self, key: str) -> None:
        """The worker failed a batch as unavailable: pass it over for a while."""
        self._suspect_until[key] = self._clock() + SUSPECT_SECONDS
