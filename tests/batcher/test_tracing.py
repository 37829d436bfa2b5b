"""The batcher's spans: one per request (queue wait, place in its batch) and one per batch,
linked to every member and parent of the worker's span."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.mesh.domain.errors import InternalError
from services.mesh.infra import telemetry
from tests.batcher.fakes import BatcherFactory, FakePool, FakeWorker, request, submit_all

SAMPLED = "00-{:032x}-00000000000000{:02x}-01"
UNSAMPLED = "00-{:032x}-00000000000000{:02x}-00"


def _named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


async def test_a_batch_span_links_its_requests_and_parents_the_worker(
    make_batcher: BatcherFactory, worker: FakeWorker, recorded_spans: InMemorySpanExporter
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.hold()
    first = request(0.0)
    first.trace = {"traceparent": SAMPLED.format(1, 1)}
    running = asyncio.create_task(batcher.infer(first))
    await worker.next_batch()
    queued = [request(1.0), request(2.0)]
    queued[0].trace = {"traceparent": UNSAMPLED.format(2, 2)}
    queued[1].trace = {"traceparent": SAMPLED.format(3, 3)}
    tasks = await submit_all(batcher, queued)
    worker.release()
    await asyncio.gather(running, *tasks)

    second = worker.batches[1]
    assert second.rows == [1, 1]
    batch = next(s for s in _named(recorded_spans, "batcher.batch")
                 if (s.attributes or {})["infermesh.batch_requests"] == 2)
    members = {(s.attributes or {})["infermesh.request_id"]: s
               for s in _named(recorded_spans, "batcher.queue")}
    assert set(members) == {"r0.0", "r2.0"}  # r1.0's trace is not sampled: not recorded
    sampled_member = members["r2.0"]
    assert batch.parent is not None and batch.parent.span_id == sampled_member.context.span_id
    assert batch.context.trace_id == 3
    # Linked: the members whose spans are recorded (r1.0's trace is not sampled).
    assert [link.context.trace_id for link in batch.links] == [3]
    assert [dict(link.attributes or {}) for link in batch.links] == [
        {"infermesh.request_id": "r2.0"},
    ]
    # The worker's span will be a child of the batch span.
    carried = telemetry.parse_traceparent(second.trace["traceparent"])
    assert carried is not None and carried.span_id == f"{batch.context.span_id:016x}"
    attributes = dict(sampled_member.attributes or {})
    assert attributes["infermesh.batch_size"] == 2
    assert attributes["infermesh.batch_position"] == 1
    wait = attributes["infermesh.queue_wait_ms"]
    assert isinstance(wait, float) and wait >= 0
    assert (attributes["infermesh.version"], attributes["infermesh.tenant"]) == ("1", "anonymous")
    assert sampled_member.parent is not None and sampled_member.parent.span_id == 3


async def test_a_failed_batch_is_recorded_even_when_not_sampled(
    make_batcher: BatcherFactory, worker: FakeWorker, recorded_spans: InMemorySpanExporter
) -> None:
    batcher = make_batcher(FakePool(worker))
    worker.failures.append(InternalError("the model raised"))
    failing = request(0.0)
    failing.trace = {"traceparent": UNSAMPLED.format(4, 4)}
    try:
        await batcher.infer(failing)
    except InternalError:
        pass
    (batch,) = _named(recorded_spans, "batcher.batch")
    (queue,) = _named(recorded_spans, "batcher.queue")
    assert [link.context.span_id for link in batch.links] == [queue.context.span_id]
    for span in (batch, queue):
        assert span.status.status_code is StatusCode.ERROR
        assert "the model raised" in (span.status.description or "")
        assert span.context.trace_id == 4
