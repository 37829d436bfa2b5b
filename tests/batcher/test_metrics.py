"""The batcher's Triton-mirrored metrics (`infermesh_inference_*`), read from its exposition the
way Prometheus reads them; and the Grafana dashboard that queries them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.batcher.metrics import BatcherMetrics
from services.mesh.domain.errors import DeadlineExceeded, InternalError
from tests.batcher.fakes import (
    MODEL,
    VERSION,
    BatcherFactory,
    FakePool,
    FakeWorker,
    request,
    results,
    submit_all,
)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "infermesh.json"
VERSION_LABELS = {"model": MODEL, "version": VERSION}


def scrape(metrics: BatcherMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, by (sample name, labels)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, frozenset({**VERSION_LABELS, **labels}.items())), 0.0)


async def test_counts_mirror_triton_and_their_ratio_is_the_average_batch_size(
    make_batcher: BatcherFactory, worker: FakeWorker, metrics: BatcherMetrics
) -> None:
    batcher = make_batcher(FakePool(worker), pipeline_depth=1)
    worker.hold()
    first = asyncio.create_task(batcher.infer(request(0.0)))
    await worker.next_batch()
    queued = await submit_all(
        batcher, [request(float(i), rows=1 + i % 2) for i in range(1, 11)]
    )
    # One request in a batch on the worker, ten in the queue.
    assert value(scrape(metrics), "infermesh_inference_pending_request_count") == 11

    worker.release()
    await results([first, *queued])

    samples = scrape(metrics)
    requests = 11
    rows = sum(sum(batch.rows) for batch in worker.batches)
    assert rows == 16 and len(worker.batches) == 2  # batches did form
    assert value(samples, "infermesh_inference_request_success_total") == requests
    assert value(samples, "infermesh_inference_count_total") == rows
    assert value(samples, "infermesh_inference_exec_count_total") == len(worker.batches)
    assert value(samples, "infermesh_inference_count_total") / value(
        samples, "infermesh_inference_exec_count_total"
    ) == pytest.approx(rows / len(worker.batches))
    assert value(samples, "infermesh_inference_queue_duration_seconds_count") == requests
    assert value(samples, "infermesh_inference_pending_request_count") == 0
    assert not any(name.startswith("infermesh_inference_request_failure") for name, _ in samples)


async def test_failed_requests_are_counted_by_their_error_code(
    make_batcher: BatcherFactory, worker: FakeWorker, metrics: BatcherMetrics
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.failures.append(InternalError("boom"))
    with pytest.raises(InternalError):
        async with asyncio.timeout(5):
            await batcher.infer(request(1.0))
    with pytest.raises(DeadlineExceeded):
        async with asyncio.timeout(5):
            await batcher.infer(request(2.0, deadline=time.time() - 1))

    samples = scrape(metrics)
    failure = "infermesh_inference_request_failure_total"
    assert value(samples, failure, reason="internal") == 1
    assert value(samples, failure, reason="deadline_exceeded") == 1
    assert value(samples, "infermesh_inference_request_success_total") == 0
    assert value(samples, "infermesh_inference_exec_count_total") == 0  # nothing came back
    assert value(samples, "infermesh_inference_pending_request_count") == 0


def test_every_dashboard_panel_queries_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
