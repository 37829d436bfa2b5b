"""The earliest deadline among a queue's requests, kept in a heap with lazy removal.

Requests leave a queue in batches, by eviction or expiry, in any order; rather than find and
remove their entries, an entry is dropped when it reaches the top and its request is no
longer queued (`live`). The heap is rebuilt when dead entries outnumber the live ones, so it
stays proportional to the queue.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class EarliestDeadline(Generic[T]):
    """Deadlines (wall-clock seconds) of queued items; `live` says whether one is queued."""

    def __init__(self, live: Callable[[T], bool]) -> None:
        self._live = live
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()

    def push(self, deadline: float | None, item: T) -> None:
        if deadline is not None:
            heapq.heappush(self._heap, (deadline, next(self._order), item))

    def earliest(self, queued: int) -> float | None:
        """The earliest deadline of a live item (None: none); `queued` is the queue's length,
        to decide when to compact."""
        heap = self._heap
        if len(heap) > 4 * queued + 64:
            self._heap = heap = [entry for entry in heap if self._live(entry[2])]
            heapq.heapify(heap)
        while heap and not self._live(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None
