"""The next-hop implementations under contract, one fixture per interface, each parametrised
over its in-process and link implementations (built in `hops`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.batcher.metrics import BatcherMetrics
from services.batcher.workers import LocalWorkerPool
from services.mesh.transport.linked import (
    LinkedInferTarget,
    LinkedWorkerPool,
    batch_handler,
    infer_handler,
)
from tests.contract.hops import (
    IMPLEMENTATIONS,
    MODEL,
    VERSION,
    WARMUP,
    InferHop,
    ScriptedWorker,
    WorkerHop,
    batcher_over,
    inflight_of,
    linked_pool,
    served,
)


@pytest.fixture(params=IMPLEMENTATIONS)
async def infer_hop(request: pytest.FixtureRequest) -> AsyncIterator[InferHop]:
    worker = ScriptedWorker()
    metrics = BatcherMetrics()
    batcher = batcher_over(worker, metrics)
    try:
        if request.param == "in-process":

            async def shut_down() -> None:
                worker.stop()
                await batcher.aclose()

            yield InferHop(batcher, batcher, metrics, worker, shut_down, lambda: 0)
        else:
            async with served(infer_handler(batcher)) as (url, kill), linked_pool(
                "batcher", {"instance": "b1", "link": url}
            ) as pool:
                target = LinkedInferTarget(pool)
                yield InferHop(target, batcher, metrics, worker, kill, inflight_of(pool))
    finally:
        worker.release()
        await batcher.aclose()


@pytest.fixture(params=IMPLEMENTATIONS)
async def worker_hop(request: pytest.FixtureRequest) -> AsyncIterator[WorkerHop]:
    worker = ScriptedWorker()
    try:
        if request.param == "in-process":

            async def crash() -> None:
                worker.stop()

            yield WorkerHop(LocalWorkerPool(worker), worker, crash, lambda: 0)
        else:
            async with served(batch_handler(worker)) as (url, kill), linked_pool(
                "worker", {"instance": worker.key, "link": url, "models": [f"{MODEL}/{VERSION}"],
                           "resident": [f"{MODEL}/{VERSION}"],
                           "warmup": {f"{MODEL}/{VERSION}": {str(k): v for k, v in WARMUP.items()}}}
            ) as pool:
                yield WorkerHop(LinkedWorkerPool(pool), worker, kill, inflight_of(pool))
    finally:
        worker.release()
