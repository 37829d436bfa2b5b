"""Requests queued while no worker serves their version: each fails at its own deadline
(DeadlineExceeded, a 504), not at the end of the no-worker grace; those with time left wait on.

A killed worker is restarted within a second or two; the grace lets its queued requests wait
for it, but never past what their callers asked for. The grace here is an hour, so a request
held to the grace fails the test by its timeout, and no wall-clock bound is asserted: a
request must fail with DeadlineExceeded, and not before its deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.mesh.domain.errors import DeadlineExceeded
from tests.batcher.fakes import BatcherFactory, FakePool, FakeWorker, request, submit_all

GRACE = 3600.0
EARLY = 0.05
"""How far before its deadline (wall clock) a request may fail: the batcher's look-again
timer runs on the loop's monotonic clock."""


async def _outcome(task: asyncio.Task[Any]) -> tuple[float, object]:
    """When (`time.time()`) `task` ended, and its exception (or result); a task held for the
    grace fails here after 60 s."""
    try:
        async with asyncio.timeout(60):
            result: object = await task
    except DeadlineExceeded as exc:
        result = exc
    return time.time(), result


async def test_queued_requests_fail_at_their_deadline_not_after_the_grace(
    make_batcher: BatcherFactory,
) -> None:
    batcher = make_batcher(FakePool(), no_worker_grace=GRACE)
    deadline = time.time() + 0.3
    tasks = await submit_all(batcher, [request(float(i), deadline=deadline) for i in range(5)])
    for task in tasks:
        ended, outcome = await _outcome(task)
        assert isinstance(outcome, DeadlineExceeded), outcome
        assert ended >= deadline - EARLY, f"failed {deadline - ended:.3f} s before its deadline"


async def test_a_later_request_with_a_nearer_deadline_is_not_held_by_an_earlier_timer(
    make_batcher: BatcherFactory,
) -> None:
    """The first request arms the look-again timer for its own (far) deadline; a request
    arriving after it with a near deadline must still fail at that near deadline."""
    batcher = make_batcher(FakePool(), no_worker_grace=GRACE)
    [far] = await submit_all(batcher, [request(1.0, deadline=time.time() + 1800.0)])
    deadline = time.time() + 0.3
    [near] = await submit_all(batcher, [request(2.0, deadline=deadline)])
    ended, outcome = await _outcome(near)
    assert isinstance(outcome, DeadlineExceeded), outcome
    assert ended >= deadline - EARLY, f"failed {deadline - ended:.3f} s before its deadline"
    assert not far.done(), "the request with half an hour left was failed early"
    far.cancel()


async def test_requests_with_time_left_still_go_to_a_worker_that_appears(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    pool = FakePool()
    batcher = make_batcher(pool, no_worker_grace=GRACE)
    short, patient = await submit_all(batcher, [
        request(1.0, deadline=time.time() + 0.3), request(2.0, deadline=time.time() + 30),
    ])
    with pytest.raises(DeadlineExceeded):
        async with asyncio.timeout(60):
            await short
    pool.add(worker)
    async with asyncio.timeout(5):
        response = await patient
    assert response.request_id == "r2.0"
    assert [b.rows for b in worker.batches] == [[1]], "the expired request reached the worker"
