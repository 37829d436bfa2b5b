"""The fair queue as a pure object: weighted sharing, lane priority, the starvation guard,
retries, expiry, and admission at the bound."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from services.batcher.fairness import FairQueue
from services.mesh.domain.types import LANES


@dataclass(eq=False)
class Item:
    name: str
    tenant: str
    lane: str = "realtime"
    rows: int = 1
    enqueued: float = 0.0
    deadline: float | None = None


def queue(
    weights: dict[str, float] | None = None, *, bound: int = 10_000, bulk_max_wait: float = 1.0
) -> FairQueue[Item]:
    known = weights or {}
    return FairQueue(bound, lambda tenant: known.get(tenant, 1.0), bulk_max_wait=bulk_max_wait)


def fill(
    fair: FairQueue[Item], tenant: str, count: int, *, lane: str = "realtime", rows: int = 1,
    enqueued: float = 0.0,
) -> list[Item]:
    """Admit `count` requests of `tenant`, each of which must fit."""
    items = [Item(f"{tenant}{i}", tenant, lane, rows, enqueued) for i in range(count)]
    for item in items:
        assert fair.admit(item) == ()
    return items


def names(items: list[Item]) -> list[str]:
    return [item.name for item in items]


@pytest.mark.parametrize(("rows_a", "rows_b", "max_rows"), [(1, 1, 4), (2, 2, 8), (1, 3, 6)])
def test_backlogged_tenants_share_rows_in_proportion_to_their_weights(
    rows_a: int, rows_b: int, max_rows: int
) -> None:
    fair = queue({"a": 1.0, "b": 3.0})
    fill(fair, "a", 300, rows=rows_a)  # all of a's requests arrive first
    fill(fair, "b", 300, rows=rows_b)
    rows: Counter[str] = Counter()
    for _ in range(60):
        batch = fair.take(max_rows, now=0.0)
        assert sum(item.rows for item in batch) <= max_rows
        for item in batch:
            rows[item.tenant] += item.rows
    total = rows["a"] + rows["b"]
    assert abs(rows["a"] - total / 4) <= max(rows_a, rows_b)  # 1:3, give or take a request


def test_a_light_tenant_is_served_within_one_round_behind_a_deep_backlog() -> None:
    fair = queue()
    fill(fair, "flood", 1000)
    fair.take(4, now=0.0)
    fair.take(4, now=0.0)
    [light] = fill(fair, "light", 1)
    assert light in fair.take(4, now=0.0)


def test_the_round_robin_position_carries_over_between_batches() -> None:
    fair = queue()
    for tenant in "abc":
        fill(fair, tenant, 10)
    firsts = [fair.take(1, now=0.0)[0].tenant for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_a_lone_tenant_is_served_in_arrival_order_up_to_the_batch_size() -> None:
    fair = queue()
    items = fill(fair, "a", 10)
    assert fair.take(4, now=0.0) == items[:4]
    assert (len(fair), fair.rows) == (6, 6)
    assert fair.rows_by_lane() == {"realtime": 6, "bulk": 0, "shadow": 0}


def test_lower_lanes_wait_until_higher_lanes_are_empty() -> None:
    fair = queue()
    [shadow] = fill(fair, "s", 1, lane="shadow")
    [bulk] = fill(fair, "b", 1, lane="bulk")
    realtime = fill(fair, "r", 3)
    assert fair.take(2, now=0.0) == realtime[:2]
    assert fair.take(2, now=0.0) == [realtime[2], bulk]
    assert fair.take(2, now=0.0) == [shadow]


def test_a_bulk_request_waiting_past_bulk_max_wait_competes_as_realtime() -> None:
    fair = queue(bulk_max_wait=1.0)
    [bulk] = fill(fair, "batch-job", 1, lane="bulk", enqueued=0.0)
    fill(fair, "interactive", 100, enqueued=0.5)
    for now in (0.2, 0.5, 0.99):
        assert bulk not in fair.take(2, now=now)
    assert bulk in fair.take(2, now=1.0)


def test_batches_hold_whole_requests_within_the_batch_size() -> None:
    fair = queue()
    items = fill(fair, "a", 3, rows=3) + fill(fair, "b", 3, rows=2)
    batches: list[list[Item]] = []
    while fair:
        batches.append(fair.take(4, now=0.0))
    assert all(sum(item.rows for item in batch) <= 4 for batch in batches)
    assert sorted(names([item for batch in batches for item in batch])) == sorted(names(items))
    [big] = fill(fair, "c", 1, rows=5)
    assert fair.take(4, now=0.0) == [big]  # alone, a request larger than a batch goes whole


def test_a_retried_request_goes_back_to_the_front_of_its_tenants_queue() -> None:
    fair = queue()
    items = fill(fair, "a", 3)
    taken = fair.take(2, now=0.0)
    for item in reversed(taken):
        fair.requeue(item)
    assert fair.take(3, now=0.0) == items


def test_expire_removes_what_waited_too_long_in_every_lane() -> None:
    fair = queue()
    fill(fair, "a", 2, enqueued=1.0)
    fill(fair, "b", 1, lane="bulk", enqueued=2.0)
    [late] = fill(fair, "c", 1, enqueued=5.0)
    assert fair.oldest_enqueued == 1.0
    assert sorted(names(fair.expire(2.0))) == ["a0", "a1", "b0"]
    assert fair.oldest_enqueued == 5.0
    assert fair.drain() == [late]
    assert (len(fair), fair.rows) == (0, 0)


def test_a_full_queue_drops_the_newest_shadow_request_first() -> None:
    fair = queue(bound=4)
    fill(fair, "s", 1, lane="shadow", enqueued=0.0)
    [newest] = fill(fair, "t", 1, lane="shadow", enqueued=1.0)
    fill(fair, "x", 2)
    assert fair.admit(Item("y0", "y")) == (newest,)
    assert fair.rows_by_lane() == {"realtime": 3, "bulk": 0, "shadow": 1}


def test_a_shadow_request_at_a_full_queue_is_refused() -> None:
    fair = queue(bound=2)
    fill(fair, "x", 1)
    fill(fair, "s", 1, lane="shadow")
    assert fair.admit(Item("late", "s", lane="shadow")) is None
    assert fair.rows == 2


def test_a_tenant_within_its_share_is_admitted_by_dropping_the_flooders_newest() -> None:
    fair = queue(bound=4)
    flood = fill(fair, "flood", 4)
    assert fair.admit(Item("l0", "light")) == (flood[3],)
    assert fair.admit(Item("l1", "light")) == (flood[2],)
    assert fair.admit(Item("l2", "light")) is None  # now at its share: 4 * 1/2
    assert fair.admit(Item("f4", "flood")) is None
    assert sorted(names(fair.take(4, now=0.0))) == ["flood0", "flood1", "l0", "l1"]


def test_shares_follow_the_weights() -> None:
    fair = queue({"light": 3.0}, bound=4)
    fill(fair, "flood", 4)
    admitted = [fair.admit(Item(f"l{i}", "light")) is not None for i in range(4)]
    assert admitted == [True, True, True, False]


def test_the_tenant_furthest_over_its_share_loses_its_newest_bulk_request_first() -> None:
    fair = queue(bound=8)
    fill(fair, "a", 3)
    [a_bulk] = fill(fair, "a", 1, lane="bulk")
    fill(fair, "a", 1)
    fill(fair, "b", 3)
    assert fair.admit(Item("c0", "c")) == (a_bulk,)


def test_an_arrival_that_needs_more_room_than_others_hold_is_refused_untouched() -> None:
    fair = queue(bound=4)
    fill(fair, "a", 1)
    fill(fair, "b", 3)
    assert fair.admit(Item("big", "a", rows=4)) is None
    assert fair.admit(Item("huge", "c", rows=5)) is None
    assert fair.rows == 4


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_never_loses_an_item_or_overfills_the_queue(seed: int) -> None:
    rng = random.Random(seed)
    fair = queue({"a": 0.5, "b": 2.0, "c": 3.0}, bound=rng.randint(4, 30), bulk_max_wait=0.5)
    queued: dict[int, Item] = {}
    for step in range(300):
        now = step * 0.05
        if rng.random() < 0.6:
            item = Item(f"i{step}", rng.choice("abcd"), rng.choice(LANES), rng.randint(1, 4), now)
            dropped = fair.admit(item)
            for gone in dropped or ():
                del queued[id(gone)]
            if dropped is not None:
                queued[id(item)] = item
        elif rng.random() < 0.9:
            batch = fair.take(max_rows := rng.randint(1, 8), now)
            assert len(batch) <= 1 or sum(item.rows for item in batch) <= max_rows
            for item in batch:
                del queued[id(item)]
        else:
            for item in fair.expire(now - 2.0):
                del queued[id(item)]
        assert (len(fair), fair.rows) == (len(queued), sum(i.rows for i in queued.values()))
        assert fair.rows <= fair.bound
        assert fair.oldest_enqueued == min((i.enqueued for i in queued.values()), default=math.inf)
