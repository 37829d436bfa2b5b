"""One lane of a batcher queue: tenants share its batch rows by weighted deficit round-robin.

Deficit round-robin (Shreedhar & Varghese, 1995) with rows as the unit: each visit gives a
tenant `weight * quantum_rows` rows of credit; it sends whole requests while its credit covers
the next one, then the next tenant is visited. A tenant's credit resets when it has nothing
left queued. The round-robin position survives across batches, so no tenant is favoured by
where it sits and a light tenant is served within one round however deep another's backlog.
Within a tenant, requests go earliest deadline first (`edf.EdfQueue`); with a single tenant
queued the lane is plain EDF.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic

from services.batcher.edf import EdfQueue, Queued, T

__all__ = ["Lane", "Queued", "T"]


@dataclass(slots=True, eq=False)
class _TenantQueue(Generic[T]):
    tenant: str
    items: EdfQueue[T] = field(default_factory=EdfQueue)
    quantum: float = 1.0
    deficit: float = 0.0


class Lane(Generic[T]):
    """Queued items of one lane, earliest deadline first per tenant."""

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
        """Queue `item` by its deadline among its tenant's items."""
        sub = self._tenant_queue(item.tenant)
        sub.items.push(item)
        self._added(sub, item.rows)

    def push_front(self, item: T) -> None:
        """Queue `item` by its deadline, ahead of its tenant's items due with it (a retry)."""
        sub = self._tenant_queue(item.tenant)
        sub.items.push_front(item)
        self._added(sub, item.rows)

    def push_overdue(self, item: T) -> None:
        """Queue `item` ahead of its tenant's items that are not overdue (a promoted item:
        its wait, not its deadline, decides, or a deadline flood would starve it)."""
        sub = self._tenant_queue(item.tenant)
        sub.items.push_overdue(item)
        self._added(sub, item.rows)

    def adopt(self, tenant: str, items: EdfQueue[T]) -> EdfQueue[T]:
        """Take `items` as `tenant`'s queue here (the lane must hold nothing of `tenant`);
        returns the empty queue they replace, for reuse."""
        sub = self._tenant_queue(tenant)
        assert not sub.items, "adopt() replaces an empty queue only"
        empty, sub.items = sub.items, items
        self._added(sub, items.rows, count=len(items))
        return empty

    @property
    def oldest_enqueued(self) -> float:
        oldest = math.inf
        for sub in self._order:
            oldest = min(oldest, sub.items.oldest())
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
        return 0 if sub is None else sub.items.rows

    def due_by(self, tenant: str, deadline: float) -> int:
        """Rows of `tenant` here that run before an item of its due at `deadline` would."""
        sub = self._tenants.get(tenant)
        return 0 if sub is None else sub.items.rows_due_by(deadline)

    def last_due_after(self, tenant: str, deadline: float) -> T | None:
        """`tenant`'s item here that runs last, if an item of its due at `deadline` would run
        before it (`EdfQueue.last_due_after`)."""
        sub = self._tenants.get(tenant)
        return None if sub is None else sub.items.last_due_after(deadline)

    def contenders(self, tenant: str) -> tuple[tuple[int, float], ...]:
        """(rows queued, rows of credit per visit) of every other tenant with queued items."""
        return tuple((sub.items.rows, sub.quantum) for sub in self._order if sub.tenant != tenant)

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
            if sub.items.first().rows <= sub.deficit:
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
            if sub.items.oldest() <= cutoff:
                taken = sub.items.pop_older(cutoff)
                self._removed(sub, sum(item.rows for item in taken), len(taken))
                found += taken
        return found

    def pop_last(self, tenant: str | None = None) -> T:
        """Remove and return the item of `tenant` (of the lane, when None) that would be
        dispatched last: the latest deadline, the newest among equal ones."""
        if tenant is None:
            sub = max(self._order, key=lambda queued: queued.items.last_key())
        else:
            sub = self._tenants[tenant]
        item = sub.items.pop_last()
        self._removed(sub, item.rows, 1)
        return item

    def _tenant_queue(self, tenant: str) -> _TenantQueue[T]:
        sub = self._tenants.get(tenant)
        if sub is None:
            sub = self._tenants[tenant] = _TenantQueue(tenant)
        return sub

    def _added(self, sub: _TenantQueue[T], rows: int, *, count: int = 1) -> None:
        if len(sub.items) == count:  # it was empty: it joins the round at the back
            sub.quantum = self._weight_of(sub.tenant) * self._quantum_rows
            sub.deficit = 0.0
            self._order.append(sub)
        self.rows += rows
        self.count += count

    def _serve(self, sub: _TenantQueue[T], out: list[T], budget: int, credit: float) -> int:
        """Move whole items from the head of `sub` to `out` while `credit` and `budget` last."""
        items = sub.items
        taken = 0
        while items:
            rows = items.first().rows
            if rows > credit - taken or (rows > budget - taken and out):
                break
            out.append(items.pop_first())
            taken += rows
            self.count -= 1
        sub.deficit -= taken
        self.rows -= taken
        if not items:
            self._leave_round(sub)
        return taken

    def _removed(self, sub: _TenantQueue[T], rows: int, count: int) -> None:
        self.rows -= rows
        self.count -= count
        if not sub.items:
            self._leave_round(sub)

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
        math.ceil((sub.items.first().rows - sub.deficit) / sub.quantum) for sub in order
    ) - 1
    if rounds > 0:
        for sub in order:
            sub.deficit += rounds * sub.quantum
