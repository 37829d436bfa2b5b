"""Requests queued while no worker serves their version: each fails at its own deadline
(DeadlineExceeded, a 504), not at the end of the no-worker grace; those with time left wait on.

A killed worker is restarted within a second or two; the grace (5 s here) lets its queued
requests wait for it, but never past what their callers asked for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.mesh.domain.errors import DeadlineExceeded
from tests.batcher.fakes import BatcherFactory, FakePool, FakeWorker, request, submit_all

GRACE = 5.0
MARGIN = 1.5
"""Generous lateness allowed on a busy 2-core machine; still far less than GRACE."""


async def _failed_after(task: asyncio.Task[Any], started: float) -> tuple[float, object]:
    """Seconds from `started` until `task` ended, and its exception (or result)."""
    try:
        async with asyncio.timeout(GRACE + 5):
            result: object = await task
    except DeadlineExceeded as exc:
        result = exc
    return time.monotonic() - started, result


async def test_queued_requests_fail_at_their_deadline_not_after_the_grace(
    make_batcher: BatcherFactory,
) -> None:
    batcher = make_batcher(FakePool(), no_worker_grace=GRACE)
    started = time.monotonic()
    deadline = time.time() + 0.3
    tasks = await submit_all(batcher, [request(float(i), deadline=deadline) for i in range(5)])
    for task in tasks:
        elapsed, outcome = await _failed_after(task, started)
        assert isinstance(outcome, DeadlineExceeded), outcome
        assert 0.25 <= elapsed < 0.3 + MARGIN, f"failed after {elapsed:.2f} s"


async def test_a_later_request_with_a_nearer_deadline_is_not_held_by_an_earlier_timer(
    make_batcher: BatcherFactory,
) -> None:
    """The first request arms the look-again timer for its own (far) deadline; a request
    arriving after it with a near deadline must still fail at that near deadline."""
    batcher = make_batcher(FakePool(), no_worker_grace=GRACE)
    [far] = await submit_all(batcher, [request(1.0, deadline=time.time() + 4.0)])
    started = time.monotonic()
    [near] = await submit_all(batcher, [request(2.0, deadline=time.time() + 0.3)])
    elapsed, outcome = await _failed_after(near, started)
    assert isinstance(outcome, DeadlineExceeded), outcome
    assert elapsed < 0.3 + MARGIN, f"failed after {elapsed:.2f} s"
    assert not far.done(), "the request with 4 s left was failed early"
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
        async with asyncio.timeout(GRACE):
            await short
    pool.add(worker)
    async with asyncio.timeout(5):
        response = await patient
    assert response.request_id == "r2.0"
    assert [b.rows for b in worker.batches] == [[1]], "the expired request reached the worker"
