"""One (model, version)'s queue as a pure policy object: lane priority, tenant fairness, bounds.

Lanes are served in strict priority (realtime, then bulk, then shadow); within a lane tenants
share rows by weight (`lanes.Lane`), and each tenant's requests go earliest deadline first
(`edf.EdfQueue`). A bulk item that has waited `bulk_max_wait` seconds moves into the realtime
lane ahead of its tenant's realtime items, so a realtime flood delays bulk work but cannot
starve it.

The queue holds at most `bound` rows. At the bound, shadow work is dropped first (latest due
first); then a tenant holding less than its weighted share of the bound is admitted by dropping
the latest-due requests of the tenant furthest over its share ("longest queue drop"); anyone
else is turned away. A tenant within its share is therefore never refused because another
flooded. What a tenant loses is the request its queue would run last (`_drop_latest_due_of`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Generic

from services.batcher.admission import Standing
from services.batcher.edf import EdfQueue
from services.batcher.lanes import Lane, T
from services.mesh.domain.types import LANES

_LANE_INDEX = {lane: index for index, lane in enumerate(LANES)}  # LANES: highest priority first
_REALTIME = _LANE_INDEX["realtime"]


class FairQueue(Generic[T]):
    """Pending items of one (model, version), by lane and tenant, bounded by `bound` rows.

    While everything queued belongs to one (tenant, lane) the items wait in one EDF queue
    (`_solo`), with no round-robin to keep. The first item of another tenant or lane moves
    them into the lanes, where items stay until the queue next empties.
    """

    def __init__(
        self, bound: int, weight_of: Callable[[str], float], *, bulk_max_wait: float = 1.0,
        quantum_rows: float = 1.0,
    ) -> None:
        self.bound = bound
        self._weight_of = weight_of
        self._bulk_max_wait = bulk_max_wait
        self._quantum_rows = quantum_rows
        self._lanes: tuple[Lane[T], ...] = tuple(
            Lane(weight_of, quantum_rows=quantum_rows) for _ in LANES
        )
        self._realtime, self._bulk, self._shadow = (
            self._lanes[_LANE_INDEX[lane]] for lane in ("realtime", "bulk", "shadow")
        )
        self._solo: EdfQueue[T] = EdfQueue()
        self._solo_tenant, self._solo_lane = "", ""
        self._rows = 0
        self._count = 0

    @property
    def rows(self) -> int:
        """Rows queued, all lanes."""
        return self._rows

    def __len__(self) -> int:
        return self._count

    @property
    def realtime_waiting(self) -> bool:
        """Whether a realtime item is queued (a bulk item promoted after `bulk_max_wait`
        counts: it is realtime now)."""
        if self._solo:
            return self._solo_lane == "realtime"
        return self._realtime.count > 0

    @property
    def oldest_enqueued(self) -> float:
        """When the longest-waiting item arrived (`inf` when empty), for the batch window."""
        if self._solo:
            return self._solo.oldest()
        return min(lane.oldest_enqueued for lane in self._lanes)

    def __iter__(self) -> Iterator[T]:
        """Every queued item, left in place (no dispatch order promised)."""
        if self._solo:
            return iter(self._solo)
        return (item for lane in self._lanes for item in lane)

    def rows_by_lane(self) -> dict[str, int]:
        found = {lane: self._lanes[index].rows for index, lane in enumerate(LANES)}
        if self._solo:
            found[LANES[_LANE_INDEX.get(self._solo_lane, _REALTIME)]] = self._rows
        return found

    def admit(self, item: T) -> tuple[T, ...] | None:
        """Queue `item` if the bound allows, making room by the rules above.

        Returns the items dropped to make room (usually none), or None when `item` is refused
        (and then nothing was dropped).
        """
        rows = item.rows
        evicted: tuple[T, ...] | None = ()
        if self._rows + rows > self.bound:
            evicted = self._make_room(item)
            if evicted is None:
                return None
        solo = self._solo
        if solo and item.tenant == self._solo_tenant and item.lane == self._solo_lane:
            solo.push(item)
        elif not self._count:
            self._solo_tenant, self._solo_lane = item.tenant, item.lane
            solo.push(item)
        else:
            self._spill()
            self._lane_of(item).push(item)
        self._rows += rows
        self._count += 1
        return evicted

    def take(self, max_rows: int, now: float) -> list[T]:
        """Remove and return the items of the next batch, in dispatch order.

        Up to `max_rows` rows (a single larger item goes alone): requests are never split, and
        a lower lane is drawn from only once every higher lane is empty.
        """
        if self._solo:
            return self._take_solo(max_rows)
        if self._bulk.count:
            for overdue in self._bulk.pop_older(now - self._bulk_max_wait):
                self._realtime.push_overdue(overdue)
        out: list[T] = []
        budget = max_rows
        for lane in self._lanes:
            if lane.count:
                budget = lane.take(out, budget)
                if lane.count:
                    break
        self._rows -= max_rows - budget
        self._count -= len(out)
        return out

    def standing(self, tenant: str, lane: str, deadline: float) -> Standing:
        """Where an item of `tenant` due at `deadline` would stand if it arrived in `lane`
        now, for admission (`admission.rows_ahead`)."""
        index = _LANE_INDEX.get(lane, _REALTIME)
        quantum = self._weight_of(tenant) * self._quantum_rows
        if self._solo:
            return self._solo_standing(tenant, index, deadline, quantum)
        own = self._lanes[index]
        return Standing(
            higher_lanes=sum(higher.rows for higher in self._lanes[:index]),
            own_due_first=own.due_by(tenant, deadline), quantum=quantum,
            others=own.contenders(tenant),
        )

    def displaced(self, tenant: str, lane: str, deadline: float) -> tuple[T, Standing] | None:
        """The queued item that an item of `tenant` due at `deadline`, arriving in `lane` now,
        would delay the most: its tenant's item in that lane that runs last, when the arrival
        would run before it (earliest deadline first); with where that item stands now
        (its rows ahead, as `standing` counts them). None when the arrival delays no one of
        its own: it runs after everything its tenant has queued there."""
        index = _LANE_INDEX.get(lane, _REALTIME)
        if self._solo:
            same = tenant == self._solo_tenant and index == _LANE_INDEX.get(self._solo_lane,
                                                                            _REALTIME)
            last = self._solo.last_due_after(deadline) if same else None
        else:
            last = self._lanes[index].last_due_after(tenant, deadline)
        if last is None:
            return None
        due = last.deadline
        standing = self.standing(tenant, lane, math.inf if due is None else due)
        # rows due by its deadline include its own
        return last, replace(standing, own_due_first=standing.own_due_first - last.rows)

    def _solo_standing(
        self, tenant: str, index: int, deadline: float, quantum: float
    ) -> Standing:
        solo_index = _LANE_INDEX.get(self._solo_lane, _REALTIME)
        if solo_index != index:
            return Standing(self._rows if solo_index < index else 0, 0, quantum)
        if tenant == self._solo_tenant:
            return Standing(0, self._solo.rows_due_by(deadline), quantum)
        solo_quantum = self._weight_of(self._solo_tenant) * self._quantum_rows
        return Standing(0, 0, quantum, ((self._rows, solo_quantum),))

    def requeue(self, item: T) -> None:
        """Put an item taken earlier back in its tenant's queue, ahead of the items due with
        it (a retry)."""
        self._spill()
        self._lane_of(item).push_front(item)
        self._rows += item.rows
        self._count += 1

    def expire(self, cutoff: float) -> list[T]:
        """Remove and return every item enqueued at or before `cutoff`."""
        solo = self._solo
        if solo:
            expired = solo.pop_older(cutoff)
        else:
            expired = [item for lane in self._lanes for item in lane.pop_older(cutoff)]
        return self._removed(expired)

    def drain(self) -> list[T]:
        """Remove and return everything queued."""
        return self.expire(math.inf)

    def _take_solo(self, max_rows: int) -> list[T]:
        solo = self._solo
        out = [solo.pop_first()]
        taken = out[0].rows
        while solo and taken + solo.first().rows <= max_rows:
            item = solo.pop_first()
            out.append(item)
            taken += item.rows
        self._rows -= taken
        self._count -= len(out)
        return out

    def _removed(self, items: list[T]) -> list[T]:
        self._rows -= sum(item.rows for item in items)
        self._count -= len(items)
        return items

    def _spill(self) -> None:
        """Move the FIFO's items into the lanes (another tenant or lane is arriving)."""
        if self._solo:
            lane = self._lanes[_LANE_INDEX.get(self._solo_lane, _REALTIME)]
            self._solo = lane.adopt(self._solo_tenant, self._solo)

    def _lane_of(self, item: T) -> Lane[T]:
        return self._lanes[_LANE_INDEX.get(item.lane, _REALTIME)]

    def _make_room(self, item: T) -> tuple[T, ...] | None:
        """What to drop so that `item` fits, or None when it is to be refused."""
        if self._lane_of(item) is self._shadow or item.rows > self.bound:
            return None
        if self._solo and self._solo_tenant == item.tenant and self._solo_lane != "shadow":
            return None  # all the queue is the arriving tenant's own
        self._spill()
        need = self._rows + item.rows - self.bound
        if self._shadow.rows >= need:
            return tuple(self._removed(self._drop_shadow(need)))
        shares = self._shares(item.tenant)
        held = self._held(item.tenant)
        others = self._realtime.rows + self._bulk.rows - held
        if held >= shares[item.tenant] or self._shadow.rows + others < need:
            return None
        evicted = self._drop_shadow(self._shadow.rows)
        need -= sum(dropped.rows for dropped in evicted)
        while need > 0:
            victim = max(
                (tenant for tenant in shares if tenant != item.tenant and self._held(tenant)),
                key=lambda tenant: self._held(tenant) - shares[tenant],
            )
            evicted.append(self._drop_latest_due_of(victim))
            need -= evicted[-1].rows
        return tuple(self._removed(evicted))

    def _drop_shadow(self, rows: int) -> list[T]:
        dropped: list[T] = []
        freed = 0
        while freed < rows:
            dropped.append(self._shadow.pop_last())
            freed += dropped[-1].rows
        return dropped

    def _drop_latest_due_of(self, tenant: str) -> T:
        """The tenant's bulk item with the latest deadline, else its realtime one (the newest
        among equal deadlines; items without one count as latest).

        The item its queue would run last, rather than the latest arrival, because it loses
        the least goodput: the latest arrival may be a short-deadline request that EDF runs
        next and that would have made its deadline, with no time left for its client to
        retry. The latest-due item waits behind everything else its tenant queued, and its
        client has the most time left to retry after the refusal's Retry-After.
        """
        lane = self._bulk if self._bulk.held(tenant) else self._realtime
        return lane.pop_last(tenant)

    def _held(self, tenant: str) -> int:
        """Rows `tenant` holds in the realtime and bulk lanes."""
        return self._realtime.held(tenant) + self._bulk.held(tenant)

    def _shares(self, arriving: str) -> dict[str, float]:
        """Each queued tenant's (and the arriving one's) weighted share of the bound, in rows."""
        tenants = {*self._realtime.tenants(), *self._bulk.tenants(), arriving}
        weights = {tenant: self._weight_of(tenant) for tenant in tenants}
        total = sum(weights.values())
        return {tenant: self.bound * weight / total for tenant, weight in weights.items()}
