"""The batcher core against an in-process fake worker pool: batching, splitting, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from services.batcher.metrics import BatcherMetrics
from services.mesh.domain.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    LinkClosed,
    Overloaded,
    Unavailable,
)
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import BatchingPolicy
from tests.batcher.fakes import (
    MODEL,
    VERSION,
    BatcherFactory,
    FakePool,
    FakeWorker,
    errors_of,
    request,
    results,
    submit_all,
)


async def test_lone_request_is_dispatched_at_once_despite_a_long_queue_delay(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker))  # max_queue_delay_ms=10000
    async with asyncio.timeout(1):
        response = await batcher.infer(request(1.0))
    assert [b.rows for b in worker.batches] == [[1]]
    assert (response.model, response.version, response.request_id) == (MODEL, VERSION, "r1.0")


async def test_requests_queued_behind_a_busy_worker_leave_as_one_batch(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker), pipeline_depth=1)
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    assert (await worker.next_batch()).rows == [1]

    queued = await submit_all(batcher, [request(float(i)) for i in range(1, 11)])
    assert worker.arrivals.empty()
    worker.release()

    assert (await worker.next_batch()).rows == [1] * 10
    await results([first, *queued])
    assert len(worker.batches) == 2


async def test_depth_two_pipelines_a_full_batch_to_a_busy_worker(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    policy = BatchingPolicy(max_batch_size=10, max_queue_delay_ms=10_000)
    batcher = make_batcher(FakePool(worker), policy=policy, pipeline_depth=2)
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()

    queued = await submit_all(batcher, [request(float(i)) for i in range(1, 11)])
    # The worker is still blocked on the first batch: the full one is sent behind it.
    assert (await worker.next_batch()).rows == [1] * 10
    worker.release()
    await results([first, *queued])


async def test_depth_two_holds_a_partial_batch_until_the_worker_frees(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    policy = BatchingPolicy(max_batch_size=10, max_queue_delay_ms=10_000)
    batcher = make_batcher(FakePool(worker), policy=policy, pipeline_depth=2)
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()

    queued = await submit_all(batcher, [request(float(i)) for i in range(1, 4)])
    assert worker.arrivals.empty()
    worker.release()
    assert (await worker.next_batch()).rows == [1, 1, 1]
    await results([first, *queued])


async def test_depth_two_pipelines_realtime_behind_a_bulk_batch_at_once(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    # Behind a job's pack a realtime request does not wait for the (here endless) window.
    policy = BatchingPolicy(max_batch_size=10, max_queue_delay_ms=10_000)
    batcher = make_batcher(FakePool(worker), policy=policy, pipeline_depth=2)
    worker.hold()
    pack = asyncio.create_task(batcher.infer(request(0.0, rows=4, lane="bulk")))
    await worker.next_batch()

    realtime = await submit_all(batcher, [request(1.0), request(2.0)])
    assert (await worker.next_batch()).rows == [1, 1]
    more_bulk = await submit_all(batcher, [request(3.0, lane="bulk")])
    assert worker.arrivals.empty()  # the pipeline is full (depth 2)
    worker.release()
    await results([pack, *realtime, *more_bulk])


async def test_outputs_are_split_back_to_their_requests(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()
    sent = [request(10.0, rows=2), request(20.0, rows=1), request(30.0, rows=3)]
    queued = await submit_all(batcher, sent)
    worker.release()

    assert (await worker.next_batch()).rows == [2, 1, 3]
    responses = await results(queued)
    for req, response in zip(sent, responses, strict=True):
        assert response.request_id == req.request_id
        assert [t.name for t in response.outputs] == ["y"]
        np.testing.assert_array_equal(response.outputs[0].array(), req.inputs[0].array())
    await results([first])


async def test_a_batch_whose_worker_dies_is_redispatched_once(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.failures = [LinkClosed("worker went away")]
    response = await results([asyncio.create_task(batcher.infer(request(5.0, rows=2)))])
    assert [b.rows for b in worker.batches] == [[2], [2]]
    np.testing.assert_array_equal(response[0].outputs[0].array(), request(5.0, rows=2)
                                  .inputs[0].array())


async def test_a_batch_failing_twice_fails_its_callers(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.failures = [LinkClosed("worker went away"), LinkClosed("again")]
    with pytest.raises(LinkClosed, match="again"):
        await results([asyncio.create_task(batcher.infer(request(1.0, rows=2)))])
    assert [b.rows for b in worker.batches] == [[2], [2]]


async def test_a_model_error_is_not_retried(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.failures = [InternalError("model failed: nan")]
    with pytest.raises(InternalError, match="nan"):
        await results([asyncio.create_task(batcher.infer(request(1.0)))])
    assert len(worker.batches) == 1


async def test_an_unexpected_worker_exception_fails_callers_instead_of_hanging(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.failures = [RuntimeError("cannot schedule new futures after shutdown")]
    with pytest.raises(InternalError, match="RuntimeError"):
        async with asyncio.timeout(5):
            await batcher.infer(request(1.0))


async def test_a_full_queue_rejects_early_with_retry_after(
    make_batcher: BatcherFactory, worker: FakeWorker, metrics: BatcherMetrics
) -> None:
    policy = BatchingPolicy(max_batch_size=16, max_queue_delay_ms=10_000, max_queue_size=3)
    batcher = make_batcher(FakePool(worker), policy=policy)
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()
    queued = await submit_all(batcher, [request(float(i)) for i in range(1, 4)])

    with pytest.raises(Overloaded) as rejected:
        await batcher.infer(request(4.0))
    assert rejected.value.retry_after is not None and rejected.value.retry_after > 0
    labels = {"model": MODEL, "version": VERSION}
    assert metrics.registry.get_sample_value("infermesh_batcher_rejected_total", labels) == 1
    worker.release()
    await results([first, *queued])


async def test_no_worker_for_the_version_fails_after_the_grace_period(
    make_batcher: BatcherFactory,
) -> None:
    batcher = make_batcher(FakePool(), no_worker_grace=0.05)
    with pytest.raises(Unavailable, match="no ready worker"):
        async with asyncio.timeout(5):
            await batcher.infer(request(1.0))


async def test_a_worker_appearing_within_the_grace_period_takes_the_request(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    pool = FakePool()
    batcher = make_batcher(pool, no_worker_grace=10.0)
    [pending] = await submit_all(batcher, [request(1.0)])
    pool.add(worker)
    async with asyncio.timeout(5):
        response = await pending
    assert response.version == VERSION
    assert [b.rows for b in worker.batches] == [[1]]


async def test_an_expired_deadline_fails_without_reaching_the_worker(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker))
    with pytest.raises(DeadlineExceeded):
        async with asyncio.timeout(5):
            await batcher.infer(request(1.0, deadline=time.time() - 1))
    assert worker.batches == []


async def test_aclose_fails_queued_requests_and_drains_the_running_batch(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()
    queued = await submit_all(batcher, [request(1.0), request(2.0)])

    closing = asyncio.create_task(batcher.aclose())
    failures = await errors_of(queued)
    assert all(isinstance(e, Unavailable) for e in failures)
    worker.release()
    async with asyncio.timeout(5):
        await closing
    assert (await first).request_id == "r0.0"
    with pytest.raises(Unavailable):
        await batcher.infer(request(3.0))


async def test_batch_sizes_are_recorded(
    make_batcher: BatcherFactory, worker: FakeWorker, metrics: BatcherMetrics
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()
    queued = await submit_all(batcher, [request(float(i)) for i in range(1, 11)])
    worker.release()
    await results([first, *queued])

    labels = {"model": MODEL, "version": VERSION}
    sample = metrics.registry.get_sample_value
    assert sample("infermesh_batcher_batch_rows_count", labels) == 2
    assert sample("infermesh_batcher_batch_rows_sum", labels) == 11
    assert sample("infermesh_batcher_batch_rows_bucket", {**labels, "le": "8.0"}) == 1


async def test_requests_that_cannot_be_joined_fail_rather_than_hang(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    batcher = make_batcher(FakePool(worker), pipeline_depth=1)
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()  # on the worker alone (what arrives in one loop turn batches)
    odd = request(1.0)
    # The gateway validates input names; a bug upstream must still not hang anyone.
    odd.inputs = [dataclasses.replace(odd.inputs[0], name="y")]
    tasks = await submit_all(batcher, [request(2.0), odd])
    worker.release()
    assert (await results([first]))[0].request_id == "r0.0"
    errors = await errors_of(tasks)
    assert all(isinstance(e, InternalError) for e in errors)
    assert (await results([asyncio.create_task(batcher.infer(request(3.0)))]))[0]


async def test_a_zero_row_request_fails_at_once_and_the_next_is_served(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    # The gateway refuses zero rows; one arriving anyway (a link, a bug) must not spin the loop.
    batcher = make_batcher(FakePool(worker))
    empty = request(0.0)
    empty.inputs = [Tensor("x", "FP32", (0, 2), b"")]
    with pytest.raises(InvalidInput, match="0 rows"):
        await asyncio.wait_for(batcher.infer(empty), timeout=1)
    response = await asyncio.wait_for(batcher.infer(request(1.0)), timeout=1)
    assert response.request_id == "r1.0"
    assert [b.rows for b in worker.batches] == [[1]]


async def test_requests_arriving_in_one_loop_turn_leave_in_one_batch(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    # A link message brings many requests in one loop turn; with no queue delay an idle
    # worker would take the first alone if each arrival decided at once. Decided once per
    # turn, they form one batch (and the batcher plans once, not once per request).
    policy = BatchingPolicy(max_batch_size=16, max_queue_delay_ms=0)
    batcher = make_batcher(FakePool(worker), policy=policy)
    tasks = await submit_all(batcher, [request(float(i)) for i in range(5)])
    assert len(await results(tasks)) == 5
    assert [b.rows for b in worker.batches] == [[1, 1, 1, 1, 1]]


async def test_batches_go_to_the_worker_that_has_the_version_loaded(
    make_batcher: BatcherFactory,
) -> None:
    cold, warm = FakeWorker("cold"), FakeWorker("warm")
    cold.loaded = False
    batcher = make_batcher(FakePool(cold, warm), pipeline_depth=1)
    for i in range(3):
        async with asyncio.timeout(5):
            await batcher.infer(request(float(i)))
    assert len(warm.batches) == 3 and cold.batches == [], "no load while a loaded one is free"
