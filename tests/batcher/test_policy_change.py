"""A version's queue policy changed at runtime (the registry's PATCH, seen as an etcd change):
the batcher's queue applies it from its next decision on, without a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.batcher.core import Batcher
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import Overloaded
from services.mesh.domain.types import BatchingPolicy, ModelVersion
from tests.batcher.fakes import (
    MODEL,
    SIGNATURE,
    VERSION,
    FakePool,
    FakeWorker,
    request,
    results,
    submit_all,
)

KEY = f"models/{MODEL}/{VERSION}"


def record(**policy: int | float) -> dict[str, object]:
    batching = BatchingPolicy(**{"max_queue_delay_ms": 10_000, **policy})  # type: ignore[arg-type]
    return ModelVersion(
        MODEL, VERSION, SIGNATURE, "file:///dev/null", "0" * 64, batching=batching
    ).to_json()


@pytest.fixture
def config() -> StaticConfig:
    return StaticConfig({KEY: record(max_batch_size=16)})


@pytest.fixture
async def batcher(config: StaticConfig, worker: FakeWorker) -> AsyncIterator[Batcher]:
    batcher = Batcher(ModelCatalog(config), FakePool(worker), pipeline_depth=1)
    batcher.start()
    yield batcher
    worker.release()
    await batcher.aclose()


async def test_a_smaller_max_batch_size_applies_to_requests_already_queued(
    batcher: Batcher, config: StaticConfig, worker: FakeWorker
) -> None:
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    assert (await worker.next_batch()).rows == [1]
    queued = await submit_all(batcher, [request(float(i)) for i in range(1, 11)])

    config.put(KEY, record(max_batch_size=4))
    worker.release()

    await results([first, *queued])
    assert [sum(b.rows) for b in worker.batches] == [1, 4, 4, 2]  # 16 before: one batch of 10


async def test_a_smaller_max_queue_size_refuses_at_once(
    batcher: Batcher, config: StaticConfig, worker: FakeWorker
) -> None:
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()
    queued = await submit_all(batcher, [request(float(i)) for i in range(1, 3)])

    config.put(KEY, record(max_batch_size=16, max_queue_size=2))
    with pytest.raises(Overloaded):
        async with asyncio.timeout(5):  # queued, under the old bound: it would wait for good
            await batcher.infer(request(3.0))
    worker.release()
    await results([first, *queued])
