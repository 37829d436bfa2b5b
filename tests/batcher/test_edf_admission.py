"""Admission counts the rows that run before an arriving request (issue 14): its tenant's
earlier-due rows, higher lanes, and other tenants up to their round-robin share; not the later-
due rows an earliest-deadline-first queue runs after it."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.batcher.admission import Backlog, Standing, refusal, rows_ahead
from services.batcher.fairness import FairQueue
from services.mesh.domain.errors import Overloaded
from services.mesh.domain.types import BatchingPolicy, InferResponse
from tests.batcher.fakes import BatcherFactory, FakePool, TimedWorker, request, submit_all
from tests.batcher.test_edf import Item

THROUGHPUT = 100.0
"""Rows per second: 100 rows ahead take 1 s."""


def admitted(fair: FairQueue[Item], arriving: Item, *, slack: float) -> bool:
    assert arriving.deadline is not None
    standing = fair.standing(arriving.tenant, arriving.lane, arriving.deadline)
    backlog = Backlog(rows_ahead(standing, arriving.rows), THROUGHPUT)
    return refusal(backlog=backlog, execution=0.01, slack=slack) is None


def fill(fair: FairQueue[Item], count: int, *, tenant: str = "a", deadline: float,
         lane: str = "realtime") -> None:
    for i in range(count):
        assert fair.admit(Item(f"{tenant}{i}", tenant, deadline, lane)) == ()


def test_a_1s_request_behind_3s_rows_is_admitted_when_its_own_rows_fit() -> None:
    fair: FairQueue[Item] = FairQueue(10_000, lambda tenant: 1.0)
    fill(fair, 200, deadline=3.0)  # 2 s of work, all due after it
    assert admitted(fair, Item("fast", deadline=1.0), slack=1.0)


def test_a_request_is_refused_when_the_rows_due_before_it_alone_miss_its_deadline() -> None:
    fair: FairQueue[Item] = FairQueue(10_000, lambda tenant: 1.0)
    fill(fair, 50, deadline=0.9)
    fill(fair, 200, deadline=3.0)
    assert admitted(fair, Item("fast", deadline=1.0), slack=1.0)
    fill(fair, 50, deadline=0.95)  # now 1 s of earlier-due work
    assert not admitted(fair, Item("fast", deadline=1.0), slack=1.0)
    assert fair.standing("a", "realtime", 1.0).own_due_first == 100


def test_higher_lanes_count_whole_and_lower_lanes_not_at_all() -> None:
    fair: FairQueue[Item] = FairQueue(10_000, lambda tenant: 1.0)
    fill(fair, 120, deadline=9.0, lane="realtime")
    assert not admitted(fair, Item("bulk", deadline=1.0, lane="bulk"), slack=1.0)
    fill(fair, 300, tenant="b", deadline=0.1, lane="shadow")
    assert admitted(fair, Item("rt", deadline=1.0), slack=1.0)


def test_other_tenants_count_up_to_their_round_robin_share() -> None:
    fair: FairQueue[Item] = FairQueue(10_000, {"a": 1.0, "b": 1.0, "heavy": 3.0}.__getitem__)
    fill(fair, 40, tenant="a", deadline=0.5)
    fill(fair, 500, tenant="b", deadline=9.0)
    fill(fair, 5, tenant="heavy", deadline=9.0)
    standing = fair.standing("a", "realtime", 1.0)
    assert standing == Standing(0, 40, 1.0, ((500, 1.0), (5, 3.0)))
    # a runs 41 rows over 41 visits; b gets one row a visit, one visit more: 42; heavy, all 5.
    assert rows_ahead(standing, 1) == 40 + 42 + 5


@pytest.mark.parametrize(("held", "quantum", "own", "expected"), [
    (1000, 1.0, 0, 2), (1000, 2.0, 3, 10), (1000, 0.5, 3, 3), (1, 4.0, 9, 1),
])
def test_the_round_robin_share_of_another_tenant(
    held: int, quantum: float, own: int, expected: int
) -> None:
    assert rows_ahead(Standing(0, own, 1.0, ((held, quantum),)), 1) - own == expected


def test_a_queue_of_one_tenant_in_another_lane_stands_like_the_lanes() -> None:
    fair: FairQueue[Item] = FairQueue(10_000, lambda tenant: 1.0)
    fill(fair, 30, tenant="b", deadline=9.0)
    assert fair.standing("a", "realtime", 1.0).others == ((30, 1.0),)
    assert fair.standing("a", "bulk", 1.0).higher_lanes == 30
    assert fair.standing("b", "realtime", 1.0).own_due_first == 0
    assert fair.standing("b", "realtime", 9.0).own_due_first == 30


# The batcher core ---------------------------------------------------------------------------

POLICY = BatchingPolicy(max_batch_size=8, max_queue_delay_ms=1.0)
WARMUP = {rows: 0.004 * rows + 0.006 for rows in (1, 2, 4, 8)}
"""The model's view: a full batch of 8 in 38 ms, about 210 rows/s."""


async def test_the_core_admits_a_short_deadline_behind_long_ones_and_runs_it_next(
    make_batcher: BatcherFactory,
) -> None:
    worker = TimedWorker(per_row=0.0005, fixed=0.001, warmup=WARMUP)
    batcher = make_batcher(FakePool(worker), policy=POLICY, pipeline_depth=1)
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(-1.0)))
    await worker.next_batch()
    # 160 rows due in 5 s: about 0.8 s of work by the model, far more than the short one's 0.5 s.
    relaxed = await submit_all(batcher, [request(float(i), deadline=time.time() + 5.0)
                                         for i in range(160)])
    try:
        urgent = asyncio.create_task(batcher.infer(request(1000.0, deadline=time.time() + 0.5)))
        await asyncio.sleep(0)  # infer() runs to its first suspension: queued or refused
        assert not (urgent.done() and isinstance(urgent.exception(), Overloaded))
    finally:
        worker.release()
    async with asyncio.timeout(10):
        responses = await asyncio.gather(first, urgent, *relaxed)
    assert all(isinstance(response, InferResponse) for response in responses)
    second = worker.batches[1].inputs[0].array()
    assert 1000.0 in second[:, 0], "the short deadline waited behind the long ones"


@pytest.mark.parametrize("spill", [False, True])
def test_the_request_an_arrival_would_delay_most_is_its_tenants_last_due_after_it(
    spill: bool,
) -> None:
    """`FairQueue.displaced` names the tenant's request that runs last, when the arrival would
    run before it, with the rows ahead of it (its own not counted); in one solo queue and in
    the lanes (another tenant queued)."""
    fair: FairQueue[Item] = FairQueue(10_000, lambda tenant: 1.0)
    fill(fair, 30, deadline=3.0)
    fill(fair, 10, deadline=0.5)
    if spill:
        fill(fair, 5, tenant="b", deadline=0.1)
    found = fair.displaced("a", "realtime", 1.0)
    assert found is not None
    last, standing = found
    assert last.deadline == 3.0 and last.name == "a29"
    assert standing.own_due_first == 39  # the other 29 due at 3 s and the 10 due at 0.5 s
    assert fair.displaced("a", "realtime", 3.0) is None  # queued behind everything of a's
    assert fair.displaced("a", "bulk", 1.0) is None  # nothing of a's in that lane
    assert fair.displaced("c", "realtime", 0.01) is None  # nothing of c's at all
