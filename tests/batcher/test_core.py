"""The batcher core against an in-process fake worker pool: batching, splitting, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.batcher.workers import WorkerHandle
from services.mesh.catalog import ModelCatalog
from services.mesh.errors import (
    DeadlineExceeded,
    InternalError,
    LinkClosed,
    Overloaded,
    Unavailable,
)
from services.mesh.etcd import StaticConfig
from services.mesh.tensors import Tensor
from services.mesh.types import (
    Batch,
    BatchingPolicy,
    BatchResult,
    InferRequest,
    InferResponse,
    ModelVersion,
    Signature,
    TensorSpec,
)

MODEL, VERSION = "m", "1"
SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)


class FakeWorker:
    """Echoes each batch's inputs as outputs; can hold batches at a gate or raise."""

    def __init__(self, key: str = "w1") -> None:
        self.key = key
        self.batches: list[Batch] = []
        self.arrivals: asyncio.Queue[Batch] = asyncio.Queue()
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: list[Exception] = []

    def hold(self) -> None:
        """Make batches wait (after arriving) until `release()`."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult:
        self.batches.append(batch)
        self.arrivals.put_nowait(batch)
        if self.failures:
            raise self.failures.pop(0)
        await self.gate.wait()
        return BatchResult([Tensor("y", t.datatype, t.shape, bytes(t.data)) for t in batch.inputs])

    async def next_batch(self) -> Batch:
        async with asyncio.timeout(5):
            return await self.arrivals.get()


class FakePool:
    """The workers serving `m/1`, changeable at run time like etcd endpoints."""

    def __init__(self, *workers: FakeWorker) -> None:
        self.workers = list(workers)
        self._listeners: list[Callable[[], None]] = []

    def candidates(self, model: str, version: str) -> list[WorkerHandle]:
        return list(self.workers) if (model, version) == (MODEL, VERSION) else []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def add(self, worker: FakeWorker) -> None:
        self.workers.append(worker)
        for listener in self._listeners:
            listener()


def catalog_with(policy: BatchingPolicy) -> ModelCatalog:
    spec = ModelVersion(MODEL, VERSION, SIGNATURE, "file:///dev/null", "0" * 64, batching=policy)
    return ModelCatalog(StaticConfig({f"models/{MODEL}/{VERSION}": spec.to_json()}))


def request(value: float, *, rows: int = 1, deadline: float | None = None) -> InferRequest:
    data = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + value
    return InferRequest(
        model=MODEL, version=VERSION, request_id=f"r{value}",
        inputs=[Tensor.from_array("x", data)], deadline=deadline,
    )


async def submit_all(
    batcher: Batcher, requests: list[InferRequest]
) -> list[asyncio.Task[InferResponse]]:
    """Start one task per request; return once every request is in the batcher's queue."""
    queued = asyncio.Event()
    started = 0

    async def one(req: InferRequest) -> InferResponse:
        nonlocal started
        started += 1
        if started == len(requests):
            queued.set()
        # infer() enqueues synchronously, before its first suspension.
        return await batcher.infer(req)

    tasks = [asyncio.create_task(one(r)) for r in requests]
    await queued.wait()
    return tasks


async def results(tasks: list[asyncio.Task[InferResponse]]) -> list[InferResponse]:
    async with asyncio.timeout(5):
        return await asyncio.gather(*tasks)


async def errors_of(tasks: list[asyncio.Task[InferResponse]]) -> list[BaseException | None]:
    async with asyncio.timeout(5):
        done = await asyncio.gather(*tasks, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in done]


@pytest.fixture
def worker() -> FakeWorker:
    return FakeWorker()


@pytest.fixture
def metrics() -> BatcherMetrics:
    return BatcherMetrics()


BatcherFactory = Callable[..., Batcher]


@pytest.fixture
async def make_batcher(
    metrics: BatcherMetrics,
) -> AsyncIterator[BatcherFactory]:
    made: list[tuple[Batcher, FakePool]] = []

    def make(
        pool: FakePool, *, policy: BatchingPolicy | None = None, pipeline_depth: int = 1,
        no_worker_grace: float = 5.0,
    ) -> Batcher:
        batcher = Batcher(
            catalog_with(policy or BatchingPolicy(max_batch_size=16, max_queue_delay_ms=10_000)),
            pool, pipeline_depth=pipeline_depth, no_worker_grace=no_worker_grace,
            metrics=metrics,
        )
        batcher.start()
        made.append((batcher, pool))
        return batcher

    yield make
    for batcher, pool in made:
        for fake in pool.workers:
            fake.release()
        await batcher.aclose()


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
