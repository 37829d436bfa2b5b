"""The batcher core with several tenants and lanes: fair shares under a flood, bounded
queues that drop shadow work first, lane order, and the metrics that show it."""

from __future__ import annotations

import asyncio

import pytest

from services.batcher.metrics import BatcherMetrics
from services.mesh.domain.errors import Overloaded
from services.mesh.domain.types import Batch, BatchingPolicy, InferResponse
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


def tenant_rows(metrics: BatcherMetrics, tenant: str) -> float:
    labels = {"model": MODEL, "tenant": tenant}
    return metrics.registry.get_sample_value("infermesh_batcher_rows_total", labels) or 0.0


def rejections(metrics: BatcherMetrics, reason: str) -> float:
    labels = {"model": MODEL, "reason": reason}
    found = metrics.registry.get_sample_value("infermesh_batcher_queue_rejections_total", labels)
    return found or 0.0


def values(batch: Batch) -> list[float]:
    """The `value` each row of the batch was made from (see `fakes.request`)."""
    return [float(row[0]) for row in batch.inputs[0].array()]


async def test_a_flooding_tenant_cannot_crowd_out_a_light_one(
    make_batcher: BatcherFactory, worker: FakeWorker, metrics: BatcherMetrics
) -> None:
    policy = BatchingPolicy(max_batch_size=4, max_queue_delay_ms=10_000, max_queue_size=16)
    batcher = make_batcher(FakePool(worker), policy=policy, tenant_weights={"light": 3.0})
    worker.hold()
    flood = await submit_all(batcher, [request(0.0, tenant="flood")])
    await worker.next_batch()
    light: list[asyncio.Task[InferResponse]] = []
    for round_ in range(10):
        # Each round the flood offers twice a batch; the light tenant its 3/4 share of one.
        flood += await submit_all(batcher, [
            request(1000.0 + 10 * round_ + i, tenant="flood") for i in range(8)
        ])
        light += await submit_all(batcher, [
            request(10.0 * round_ + i, tenant="light") for i in range(3)
        ])
        worker.step()
        await worker.next_batch()
        if round_ == 0:
            before = {t: tenant_rows(metrics, t) for t in ("flood", "light")}
    light_rows = tenant_rows(metrics, "light") - before["light"]
    flood_rows = tenant_rows(metrics, "flood") - before["flood"]
    assert light_rows + flood_rows == 9 * 4  # nine full batches since the first round
    assert abs(light_rows - 0.75 * (light_rows + flood_rows)) <= 1  # weights 3:1
    worker.release()

    assert len(await results(light)) == 30
    failures = [e for e in await errors_of(flood) if e is not None]
    assert failures and all(isinstance(e, Overloaded) for e in failures)
    assert rejections(metrics, "full") > 0 and rejections(metrics, "evicted") > 0


async def test_a_full_queue_drops_shadow_work_to_admit_a_realtime_request(
    make_batcher: BatcherFactory, worker: FakeWorker, metrics: BatcherMetrics
) -> None:
    policy = BatchingPolicy(max_batch_size=4, max_queue_delay_ms=10_000, max_queue_size=2)
    batcher = make_batcher(FakePool(worker), policy=policy)
    worker.hold()
    first = await submit_all(batcher, [request(0.0)])
    await worker.next_batch()
    [mirror, queued] = await submit_all(batcher, [request(1.0, lane="shadow"), request(2.0)])

    [admitted] = await submit_all(batcher, [request(3.0)])
    [dropped] = await errors_of([mirror])
    assert isinstance(dropped, Overloaded) and dropped.retry_after
    worker.release()
    await results([*first, queued, admitted])
    assert values(worker.batches[-1]) == [2.0, 3.0]
    assert rejections(metrics, "evicted") == 1


async def test_realtime_work_goes_before_bulk_and_bulk_before_shadow(
    make_batcher: BatcherFactory, worker: FakeWorker
) -> None:
    policy = BatchingPolicy(max_batch_size=1, max_queue_delay_ms=10_000)
    batcher = make_batcher(FakePool(worker), policy=policy)
    worker.hold()
    first = await submit_all(batcher, [request(0.0)])
    await worker.next_batch()
    queued = await submit_all(batcher, [
        request(1.0, lane="shadow"), request(2.0, lane="bulk"), request(3.0),
    ])
    worker.release()
    await results([*first, *queued])
    assert [values(batch) for batch in worker.batches[1:]] == [[3.0], [2.0], [1.0]]


async def test_queue_depth_is_reported_per_lane(
    make_batcher: BatcherFactory, worker: FakeWorker, metrics: BatcherMetrics
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.hold()
    first = await submit_all(batcher, [request(0.0)])
    await worker.next_batch()
    queued = await submit_all(batcher, [
        request(1.0, rows=3), request(2.0, rows=2, lane="bulk"), request(3.0, tenant="other"),
    ])

    def depth(lane: str) -> float | None:
        labels = {"model": MODEL, "version": VERSION, "lane": lane}
        return metrics.registry.get_sample_value("infermesh_batcher_queue_rows", labels)

    assert (depth("realtime"), depth("bulk"), depth("shadow")) == (4, 2, 0)
    worker.release()
    await results([*first, *queued])
    assert depth("realtime") == 0


@pytest.mark.parametrize("lane", ["realtime", "shadow"])
async def test_a_request_over_its_share_of_a_full_queue_is_refused_with_retry_after(
    make_batcher: BatcherFactory, worker: FakeWorker, lane: str
) -> None:
    policy = BatchingPolicy(max_batch_size=4, max_queue_delay_ms=10_000, max_queue_size=2)
    batcher = make_batcher(FakePool(worker), policy=policy)
    worker.hold()
    first = await submit_all(batcher, [request(0.0)])
    await worker.next_batch()
    queued = await submit_all(batcher, [request(1.0), request(2.0, tenant="other")])

    with pytest.raises(Overloaded, match="full") as refused:
        await batcher.infer(request(3.0, lane=lane))
    assert refused.value.retry_after
    worker.release()
    await results([*first, *queued])
