"""One lane of a batcher queue: tenants share its batch rows by weighted deficit round-robin.

Deficit round-robin (Shreedhar & Varghese, 1995) with rows as the unit: each visit gives a
tenant `weight * quantum_rows` rows of credit; it sends whole requests while its credit covers
the next one, then the next tenant is visited. A tenant's credit resets when it has nothing
left queued. The round-robin position survives across batches, so no tenant is favoured by
where it sits and a light tenant is served within one round however deep another's backlog.
With a single tenant queued the lane is plain FIFO.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


T = TypeVar("T", bound=Queued)


@dataclass(slots=True, eq=False)
class _TenantQueue(Generic[T]):
    tenant: str
    items: deque[T] = field(default_factory=deque)
    rows: int = 0
    quantum: float = 1.0
    deficit: float = 0.0


class Lane(Generic[T]):
    """Queued items of one lane, FIFO per tenant."""

    def __init__(self, weight_of: Callable[[str], float], *, quantum_rows: float = 1.0) -> None:
        self._weight_of = weight_of
        self._quantum_rows = quantum_rows
        self._tenants: dict[str, _TenantQueue[T]] = {}
        """Every tenant seen here; kept when empty so a lone tenant allocates nothing."""
        self._order: deque[_TenantQueue[T]] = deque()
        """Tenants with queued items in round-robin order; the head is being visited."""
        self._granted = False
        """Whether the head has had its quantum for the current visit."""
        self.rows = 0
        self.count = 0

    def push(self, item: T) -> None:
        """Queue `item` behind its tenant's other items."""
        sub = self._tenants.get(item.tenant) or self._tenant_queue(item.tenant)
        sub.items.append(item)
        self._added(sub, item.rows)

    def push_front(self, item: T) -> None:
        """Queue `item` ahead of its tenant's other items (a retry)."""
        sub = self._tenant_queue(item.tenant)
        sub.items.appendleft(item)
        self._added(sub, item.rows)

    def insert_by_age(self, item: T) -> None:
        """Queue `item` among its tenant's items in order of arrival (a promoted item)."""
        sub = self._tenant_queue(item.tenant)
        sub.items.insert(bisect_right(sub.items, item.enqueued, key=_enqueued), item)
        self._added(sub, item.rows)

    @property
    def oldest_enqueued(self) -> float:
        oldest = math.inf
        for sub in self._order:
            oldest = min(oldest, sub.items[0].enqueued)
        return oldest

    def __iter__(self) -> Iterator[T]:
        """Every queued item (no dispatch order promised)."""
        return (item for sub in self._order for item in sub.items)

    def tenants(self) -> Iterator[str]:
        """Tenants with queued items."""
        return (sub.tenant for sub in self._order)

    def held(self, tenant: str) -> int:
        """Rows `tenant` has queued here."""
        sub = self._tenants.get(tenant)
        return 0 if sub is None else sub.rows

    def take(self, out: list[T], budget: int) -> int:
        """Move the next items to `out` within `budget` rows (or one item, if `out` is empty)
        until the batch is full or the lane is empty; returns the budget left."""
        if len(self._order) == 1:  # nobody to be fair to: FIFO, and no credit carried forward
            sub = self._order[0]
            budget -= self._serve(sub, out, budget, math.inf)
            sub.deficit, self._granted = 0.0, False
            return budget
        return self._take_round_robin(out, budget)

    def _take_round_robin(self, out: list[T], budget: int) -> int:
        order = self._order
        idle_visits = 0
        while order and budget > 0:
            sub = order[0]
            if not self._granted:
                sub.deficit += sub.quantum
                self._granted = True
            before = len(out)
            budget -= self._serve(sub, out, budget, sub.deficit)
            if not sub.items:
                idle_visits = 0
                continue  # _serve took it out of the round
            if sub.items[0].rows <= sub.deficit:
                break  # the batch is full: this visit goes on in the next batch
            order.rotate(-1)
            self._granted = False
            idle_visits = 0 if len(out) > before else idle_visits + 1
            if idle_visits >= len(order):
                _skip_idle_rounds(order)
                idle_visits = 0
        return budget

    def pop_older(self, cutoff: float) -> list[T]:
        """Remove and return every item enqueued at or before `cutoff`."""
        found: list[T] = []
        for sub in list(self._order):
            while sub.items and sub.items[0].enqueued <= cutoff:
                found.append(self._pop(sub, newest=False))
        return found

    def pop_newest(self, tenant: str | None = None) -> T:
        """Remove and return the newest item of `tenant`, or of the lane when None."""
        if tenant is None:
            sub = max(self._order, key=lambda queued: queued.items[-1].enqueued)
        else:
            sub = self._tenants[tenant]
        return self._pop(sub, newest=True)

    def _tenant_queue(self, tenant: str) -> _TenantQueue[T]:
        sub = self._tenants.get(tenant)
        if sub is None:
            sub = self._tenants[tenant] = _TenantQueue(tenant)
        return sub

    def _added(self, sub: _TenantQueue[T], rows: int) -> None:
        if len(sub.items) == 1:  # it was empty: it joins the round at the back
            sub.quantum = self._weight_of(sub.tenant) * self._quantum_rows
            sub.deficit = 0.0
            self._order.append(sub)
        sub.rows += rows
        self.rows += rows
        self.count += 1

    def _serve(self, sub: _TenantQueue[T], out: list[T], budget: int, credit: float) -> int:
        """Move whole items from the head of `sub` to `out` while `credit` and `budget` last."""
        items = sub.items
        taken = 0
        while items:
            rows = items[0].rows
            if rows > credit - taken or (rows > budget - taken and out):
                break
            out.append(items.popleft())
            taken += rows
            self.count -= 1
        sub.deficit -= taken
        sub.rows -= taken
        self.rows -= taken
        if not items:
            self._leave_round(sub)
        return taken

    def _pop(self, sub: _TenantQueue[T], *, newest: bool) -> T:
        item = sub.items.pop() if newest else sub.items.popleft()
        sub.rows -= item.rows
        self.rows -= item.rows
        self.count -= 1
        if not sub.items:
            self._leave_round(sub)
        return item

    def _leave_round(self, sub: _TenantQueue[T]) -> None:
        sub.deficit = 0.0
        if self._order[0] is sub:
            self._order.popleft()
            self._granted = False
        else:
            self._order.remove(sub)


def _skip_idle_rounds(order: deque[_TenantQueue[T]]) -> None:
    """After a round in which nobody's credit covered their next item, add the credit of the
    further rounds that would also pass idle, so that the next round serves someone."""
    rounds = min(
        math.ceil((sub.items[0].rows - sub.deficit) / sub.quantum) for sub in order
    ) - 1
    if rounds > 0:
        for sub in order:
            sub.deficit += rounds * sub.quantum


def _enqueued(item: Queued) -> float:
    return item.enqueued
