"""Fixtures for the batcher's core tests: a fake worker, metrics, and a batcher factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest

from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.mesh.domain.types import BatchingPolicy
from tests.batcher.fakes import BatcherFactory, FakePool, FakeWorker, catalog_with


@pytest.fixture
def worker() -> FakeWorker:
    return FakeWorker()


@pytest.fixture
def metrics() -> BatcherMetrics:
    return BatcherMetrics()


@pytest.fixture
async def make_batcher(
    metrics: BatcherMetrics,
) -> AsyncIterator[BatcherFactory]:
    made: list[tuple[Batcher, FakePool]] = []

    def make(
        pool: FakePool, *, policy: BatchingPolicy | None = None, pipeline_depth: int = 1,
        no_worker_grace: float = 5.0, tenant_weights: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Batcher:
        catalog = catalog_with(
            policy or BatchingPolicy(max_batch_size=16, max_queue_delay_ms=10_000),
            tenant_weights=tenant_weights,
        )
        batcher = Batcher(
            catalog, pool, pipeline_depth=pipeline_depth, no_worker_grace=no_worker_grace,
            metrics=metrics, clock=clock,
        )
        batcher.start()
        made.append((batcher, pool))
        return batcher

    yield make
    for batcher, pool in made:
        for fake in pool.workers:
            fake.release()
        await batcher.aclose()
