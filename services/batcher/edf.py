"""One tenant's items in one lane, earliest deadline first.

On one server, running the earliest-due request first meets every set of deadlines that any
order can meet (Jackson's rule). FIFO made a tenant's 1 s request wait behind the 3 s requests
that arrived before it, so a burst of mixed classes missed the short ones although EDF could
have met both. Equal deadlines keep arrival order; items without a deadline go last, FIFO.

Items leave in three orders: dispatch takes the earliest due, expiry and bulk promotion the
oldest arrivals, eviction the last in dispatch order. A heap per order indexes the same
entries; an entry removed through one heap is marked gone and left in the others until it
reaches their top, and a heap is rebuilt once its gone entries outnumber the live ones (by 64),
so each stays proportional to the queue. The eviction heap is built only when something is evicted
(a full queue) and kept until the queue next empties, so the usual push costs two heap pushes.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What a queue needs to know about an item."""

    @property
    def tenant(self) -> str: ...

    @property
    def lane(self) -> str:
        """One of `services.mesh.domain.types.LANES`; anything else queues as realtime."""

    @property
    def rows(self) -> int: ...

    @property
    def enqueued(self) -> float:
        """Clock value when the item arrived (the clock that `now` arguments read)."""

    @property
    def deadline(self) -> float | None:
        """Wall-clock time its answer is due by (None: no deadline). Only compared with
        other items' deadlines, never with `enqueued`."""


T = TypeVar("T", bound=Queued)

OVERDUE = -math.inf
"""The due rank of an item that waited its lane's longest (a promoted bulk item): first."""


class _Entry(Generic[T]):
    __slots__ = ("item", "live")

    def __init__(self, item: T) -> None:
        self.item = item
        self.live = True


_Key = tuple[float, float, int]
_ByDue = tuple[float, float, int, _Entry[T]]
_ByAge = tuple[float, int, _Entry[T]]


class EdfQueue(Generic[T]):
    """Items in order of deadline, then arrival; rows and count kept as they come and go."""

    __slots__ = ("_by_age", "_by_due", "_by_last", "_count", "_front", "_latest", "_next",
                 "rows")

    def __init__(self) -> None:
        self._by_due: list[_ByDue[T]] = []
        self._by_age: list[_ByAge[T]] = []
        self._by_last: list[_ByDue[T]] | None = None
        """Negated keys, built at the first eviction (see the module docstring)."""
        self._count = 0
        self._next = 0
        self._front = 0
        self._latest = -math.inf
        """No due rank pushed since the queue was last empty is later than this."""
        self.rows = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[T]:
        """Every item (no order promised)."""
        return (entry.item for _, _, _, entry in self._by_due if entry.live)

    def push(self, item: T) -> None:
        """Queue `item` by its deadline, behind the items due at the same time."""
        self._next += 1
        self._push(item, _due(item), self._next)

    def push_front(self, item: T) -> None:
        """Queue `item` by its deadline, ahead of items due at the same time (a retry)."""
        self._front -= 1
        self._push(item, _due(item), self._front)

    def push_overdue(self, item: T) -> None:
        """Queue `item` ahead of every item not overdue, by arrival among the overdue."""
        self._next += 1
        self._push(item, OVERDUE, self._next)

    def first(self) -> T:
        """The item dispatch takes next (the queue must not be empty)."""
        return self._head_due()[3].item

    def pop_first(self) -> T:
        """Remove and return the item dispatch takes next (the queue must not be empty)."""
        self._head_due()
        return self._gone(heapq.heappop(self._by_due)[3])

    def oldest(self) -> float:
        """When the longest-waiting item arrived (`inf` when empty)."""
        return self._head_age()[0] if self._count else math.inf

    def pop_older(self, cutoff: float) -> list[T]:
        """Remove and return, oldest first, every item enqueued at or before `cutoff`."""
        found: list[T] = []
        while self._count and self._head_age()[0] <= cutoff:
            found.append(self._gone(heapq.heappop(self._by_age)[2]))
        return found

    def last_due_after(self, deadline: float) -> T | None:
        """The item dispatch would take last, if it is due after `deadline` (an arrival due
        at `deadline` would be queued ahead of it); else None. Cheap when nothing queued is
        due after `deadline` (the usual arrival, at the back); otherwise it keeps the
        eviction heap (see the module docstring) until the queue next empties."""
        if not self._count or deadline >= self._latest:
            return None
        due, _, _, entry = self._head_last_heap()[0]
        return entry.item if -due > deadline else None

    def last_key(self) -> _Key:
        """The (due, enqueued, order) rank of the item dispatch would take last."""
        due, enqueued, order, _ = self._head_last_heap()[0]
        return -due, -enqueued, -order

    def pop_last(self) -> T:
        """Remove and return the item dispatch would take last."""
        return self._gone(heapq.heappop(self._head_last_heap())[3])

    def rows_due_by(self, deadline: float) -> int:
        """Rows of the items dispatch takes before one due at `deadline` arriving now."""
        if deadline >= self._latest:
            return self.rows
        heap, rows, stack = self._by_due, 0, [0]
        while stack:  # heap order: a node's subtree is due no earlier than the node
            index = stack.pop()
            if index < len(heap) and heap[index][0] <= deadline:
                entry = heap[index][3]
                rows += entry.item.rows if entry.live else 0
                stack += (2 * index + 1, 2 * index + 2)
        return rows

    def _push(self, item: T, due: float, order: int) -> None:
        entry = _Entry(item)
        heapq.heappush(self._by_due, (due, item.enqueued, order, entry))
        heapq.heappush(self._by_age, (item.enqueued, order, entry))
        if self._by_last is not None:
            heapq.heappush(self._by_last, (-due, -item.enqueued, -order, entry))
        self._latest = max(self._latest, due)
        self._count += 1
        self.rows += item.rows

    def _gone(self, entry: _Entry[T]) -> T:
        entry.live = False
        self._count -= 1
        self.rows -= entry.item.rows
        if not self._count:  # what is left is gone: start afresh, keeping the lists
            self._by_due.clear()
            self._by_age.clear()
            self._by_last = None
            self._latest = -math.inf
        else:
            self._compact()
        return entry.item

    def _head_due(self) -> _ByDue[T]:
        heap = self._by_due
        while not heap[0][3].live:
            heapq.heappop(heap)
        return heap[0]

    def _head_age(self) -> _ByAge[T]:
        heap = self._by_age
        while not heap[0][2].live:
            heapq.heappop(heap)
        return heap[0]

    def _head_last_heap(self) -> list[_ByDue[T]]:
        heap = self._by_last
        if heap is None:
            heap = self._by_last = [(-due, -at, -order, entry)
                                    for due, at, order, entry in self._by_due if entry.live]
            heapq.heapify(heap)
        while not heap[0][3].live:
            heapq.heappop(heap)
        return heap

    def _compact(self) -> None:
        limit = 2 * self._count + 64
        if len(self._by_due) > limit:
            self._by_due = [entry for entry in self._by_due if entry[3].live]
            heapq.heapify(self._by_due)
        if len(self._by_age) > limit:
            self._by_age = [entry for entry in self._by_age if entry[2].live]
            heapq.heapify(self._by_age)
        if self._by_last is not None and len(self._by_last) > limit:
            self._by_last = [entry for entry in self._by_last if entry[3].live]
            heapq.heapify(self._by_last)


def _due(item: Queued) -> float:
    deadline = item.deadline
    return math.inf if deadline is None else deadline
