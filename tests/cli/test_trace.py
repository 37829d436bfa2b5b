"""`infermesh trace REQUEST_ID` over span files: the request's hops, and the batch it rode in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from cli.main import main
from services.mesh.domain.errors import Unavailable
from services.mesh.infra import telemetry
from services.mesh.infra.spanfile import SpanFileExporter


def _hops(request_id: str, parent: str) -> telemetry.HopSpan:
    """gateway → router → batcher spans of one request; returns the batcher's."""
    gateway = telemetry.start("gateway.infer", kind=telemetry.SERVER, traceparent=parent)
    gateway.set("infermesh.request_id", request_id)
    gateway.set("infermesh.tenant", "demo")
    router = telemetry.start("router.route", gateway.carrier())
    router.set("infermesh.bucket", 4242)
    queue = telemetry.start("batcher.queue", router.carrier())
    queue.set("infermesh.request_id", request_id)
    queue.set("infermesh.queue_wait_ms", 0.4)
    for span in (queue, router, gateway):
        span.end()
    return queue


@pytest.fixture
def trace_dir(tmp_path: Path) -> Iterator[Path]:
    """Span files of two requests batched together, and of one failed unsampled request."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    telemetry.setup_tracing("mesh", {"INFERMESH_TRACE_SAMPLE_RATIO": "0"}, sinks=[
        SimpleSpanProcessor(SpanFileExporter(tmp_path, "mesh")),
    ])
    try:
        first = _hops("req-a", "00-" + "a" * 32 + "-" + "1" * 16 + "-01")
        second = _hops("req-b", "00-" + "b" * 32 + "-" + "2" * 16 + "-01")
        batch = telemetry.start_batch("batcher.batch", [first, second])
        batch.set("infermesh.batch_requests", 2)
        compute = telemetry.start("worker.compute", batch.carrier())
        compute.set("infermesh.device", "cpu")
        compute.end()
        batch.end()
        failed = telemetry.start("gateway.infer")  # ratio 0: not sampled
        failed.set("infermesh.request_id", "req-failed")
        failed.end(Unavailable("no ready worker for mlp/2"))
        telemetry.flush()
    finally:
        telemetry.setup_tracing("test", {})
    yield tmp_path


def test_the_waterfall_shows_every_hop_and_the_batch_the_request_rode_in(
    trace_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", "req-b", "--trace-dir", str(trace_dir), "--wait", "0"]) == 0
    out = capsys.readouterr().out
    assert f"trace {'b' * 32}" in out
    lines = out.splitlines()
    hops = [line.split()[2:4] for line in lines[4:] if line[:9].strip()]
    assert hops == [
        ["gateway.infer", "@mesh"], ["router.route", "@mesh"], ["batcher.queue", "@mesh"],
        ["↪", "batcher.batch"], ["worker.compute", "@mesh"],
    ]
    assert "bucket=4242" in out and "queue_wait_ms=0.4" in out and "tenant=demo" in out
    assert "(linked: a batch of 2 requests)" in out and "device=cpu" in out


def test_json_output_and_errors(trace_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "req-a", "--trace-dir", str(trace_dir), "--wait", "0", "--json"]) == 0
    body = orjson.loads(capsys.readouterr().out)
    assert body["trace_id"] == "a" * 32
    assert [(s["name"], s["depth"], s["linked"]) for s in body["spans"]] == [
        ("gateway.infer", 0, False), ("router.route", 1, False), ("batcher.queue", 2, False),
        ("batcher.batch", 3, False), ("worker.compute", 4, False),
    ]
    assert body["spans"][0]["start_offset_ms"] == 0.0

    assert main(["trace", "req-failed", "--trace-dir", str(trace_dir), "--wait", "0"]) == 0
    assert "ERROR: UNAVAILABLE: NO READY WORKER" in capsys.readouterr().out.upper()

    assert main(["trace", "nope", "--trace-dir", str(trace_dir), "--wait", "0"]) == 1
    assert "no spans for request nope" in capsys.readouterr().err
