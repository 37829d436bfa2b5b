"""Trace context parsing, the sampling rules (errors always recorded) and batch span links."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.mesh.domain import tracing
from services.mesh.domain.errors import (
    DeadlineExceeded,
    ModelFailed,
    Overloaded,
    QuotaExceeded,
    Unavailable,
)
from services.mesh.infra import telemetry
from services.mesh.infra.spanfile import SpanFileExporter, read_spans

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_traceparent_parsing_follows_w3c() -> None:
    context = telemetry.parse_traceparent(PARENT)
    assert context == telemetry.TraceContext(
        "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", True
    )
    assert context.traceparent() == PARENT
    assert telemetry.parse_traceparent(PARENT.upper()) == context
    assert telemetry.parse_traceparent(PARENT[:-2] + "00").sampled is False  # type: ignore[union-attr]
    for bad in ("", "junk", PARENT[:-1], "ff" + PARENT[2:],
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"):
        assert telemetry.parse_traceparent(bad) is None, bad
    assert telemetry.trace_id_of({"traceparent": PARENT}) == "0af7651916cd43dd8448eb211c80319c"
    assert telemetry.trace_id_of({}) is None


def test_a_span_continues_the_callers_trace_and_names_itself_as_the_next_parent(
    recorded_spans: InMemorySpanExporter,
) -> None:
    span = telemetry.start("gateway.infer", kind=telemetry.SERVER, traceparent=PARENT)
    assert span.trace_id == "0af7651916cd43dd8448eb211c80319c" and span.sampled
    child = telemetry.start("router.route", span.carrier())
    assert child.parent == span.context and child.trace_id == span.trace_id
    child.set("infermesh.version", "2")
    child.set("infermesh.bucket", None)  # absent values are not recorded
    child.end()
    span.end()
    router, gateway = recorded_spans.get_finished_spans()
    assert (gateway.name, gateway.kind, router.name) == (
        "gateway.infer", SpanKind.SERVER, "router.route",
    )
    assert gateway.parent is not None and gateway.parent.span_id == 0xB7AD6B7169203331
    assert router.parent is not None and router.parent.span_id == gateway.context.span_id
    assert f"{gateway.context.span_id:016x}" == span.context.span_id
    assert dict(router.attributes or {}) == {"infermesh.version": "2"}
    assert gateway.resource.attributes["service.name"] == "infermesh-test"


def test_an_unsampled_trace_records_only_its_errors(recorded_spans: InMemorySpanExporter) -> None:
    unsampled = PARENT[:-2] + "00"
    quiet = telemetry.start("gateway.infer", traceparent=unsampled)
    quiet.end()
    failed = telemetry.start("batcher.queue", traceparent=unsampled)
    failed.end(Unavailable("no ready worker"))
    (recorded,) = recorded_spans.get_finished_spans()
    assert recorded.name == "batcher.queue"
    assert recorded.status.status_code is StatusCode.ERROR
    assert "no ready worker" in (recorded.status.description or "")
    assert (recorded.attributes or {})["error.type"] == "unavailable"
    assert recorded.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C


def test_new_traces_are_sampled_at_the_configured_ratio() -> None:
    telemetry.setup_tracing("test", {"INFERMESH_TRACE_SAMPLE_RATIO": "0"})
    assert not any(telemetry.start("x").sampled for _ in range(200))
    telemetry.setup_tracing("test", {"INFERMESH_TRACE_SAMPLE_RATIO": "0.5"})
    share = sum(telemetry.start("x").sampled for _ in range(2000)) / 2000
    assert 0.4 < share < 0.6
    telemetry.setup_tracing("test", {"INFERMESH_TRACE_SAMPLE_RATIO": "oops"})
    assert telemetry.sample_ratio() == telemetry.DEFAULT_SAMPLE_RATIO
    telemetry.setup_tracing("test", {})
    assert not telemetry.recording()


def test_a_batch_span_is_a_child_of_its_first_sampled_member_and_links_to_recorded_ones(
    recorded_spans: InMemorySpanExporter,
) -> None:
    members = [telemetry.start("batcher.queue", traceparent=tp) for tp in (
        PARENT[:-2] + "00", "00-11111111111111111111111111111111-2222222222222222-01",
        "00-33333333333333333333333333333333-4444444444444444-01",
    )]
    for index, member in enumerate(members):
        member.set("infermesh.request_id", f"r{index}")
    batch = telemetry.start_batch("batcher.batch", members)
    assert batch.sampled and batch.parent == members[1].context
    batch.end()
    (recorded,) = recorded_spans.get_finished_spans()
    assert recorded.context.trace_id == 0x11111111111111111111111111111111
    assert [(link.context.span_id, dict(link.attributes or {})) for link in recorded.links] == [
        (int(m.context.span_id, 16), {"infermesh.request_id": f"r{i}"})
        for i, m in enumerate(members) if i > 0  # r0's trace is not sampled: no span to link
    ]


def test_nothing_is_recorded_without_a_configured_destination() -> None:
    telemetry.setup_tracing("test", {"INFERMESH_TRACE_SAMPLE_RATIO": "1"})
    span = telemetry.start("gateway.infer")
    assert span.sampled and not telemetry.recording()
    span.end(Unavailable("x"))  # no exporter: a no-op, not an error


def test_the_span_file_holds_what_infermesh_trace_reads(tmp_path: Path) -> None:
    exporter = SpanFileExporter(tmp_path, "router", max_bytes=4_000)
    telemetry.setup_tracing("router", {"INFERMESH_TRACE_SAMPLE_RATIO": "1"},
                            sinks=[SimpleSpanProcessor(exporter)])
    try:
        span = telemetry.start("router.route", traceparent=PARENT)
        span.set("infermesh.request_id", "req-1")
        span.end(Unavailable("gone"))
        for _ in range(15):  # past max_bytes: the file rotates once
            telemetry.start("filler").end()
    finally:
        telemetry.setup_tracing("test", {})
    assert exporter.path.with_name(exporter.path.name + ".1").exists()
    found = [s for s in read_spans(tmp_path) if s.attributes.get("infermesh.request_id")]
    assert [(s.name, s.service, s.trace_id, s.parent_id, s.status[:5]) for s in found] == [
        ("router.route", "infermesh-router", "0af7651916cd43dd8448eb211c80319c",
         "b7ad6b7169203331", "error"),
    ]
    assert found[0].duration_ns >= 0
    (tmp_path / "torn.jsonl").write_text('{"trace_id": "ab"\n')
    assert len(list(read_spans(tmp_path))) == len(list(read_spans(tmp_path)))


def test_spans_reach_an_otlp_grpc_collector_named_by_the_environment() -> None:
    """The default protocol (OTLP/gRPC, what Jaeger takes on 4317), against a real gRPC
    trace service that decodes what it is sent; the endpoint comes from the settings given,
    not from this process's environment."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[str] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's naming)
            received.extend(
                span.name for spans in request.resource_spans
                for scope in spans.scope_spans for span in scope.spans
            )
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        Collector(), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        telemetry.setup_tracing("gateway", {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "INFERMESH_TRACE_SAMPLE_RATIO": "1",
        })
        telemetry.start("gateway.infer", kind=telemetry.SERVER).end()
        telemetry.flush()
    finally:
        telemetry.setup_tracing("test", {})
        server.stop(None)
    assert received == ["gateway.infer"]


def test_unsampled_load_shedding_spans_are_exported_within_a_budget() -> None:
    """A refusal storm must not cost an export per refusal: unsampled Overloaded /
    QuotaExceeded / DeadlineExceeded spans are recorded at most `shed_per_second` a second
    (a burst of as many); other errors, and sampled traces, always."""
    exported: list[str] = []
    now = [100.0]
    tracing.configure(0.0, lambda span, error, end_ns: exported.append(type(error).__name__),
                      shed_per_second=2, clock=lambda: now[0])
    try:
        unsampled = PARENT[:-2] + "00"
        ended = [telemetry.start("gateway.infer", traceparent=unsampled).end(error)
                 for error in (Overloaded("x"), QuotaExceeded("x"), DeadlineExceeded("x"),
                               Overloaded("x"), Unavailable("x"), ModelFailed("x"))]
        assert ended == [True, True, False, False, True, True]
        assert exported == ["Overloaded", "QuotaExceeded", "Unavailable", "ModelFailed"]
        assert telemetry.start("gateway.infer", traceparent=PARENT).end(Overloaded("x"))
        now[0] += 0.5  # one token back
        assert telemetry.start("gateway.infer", traceparent=unsampled).end(Overloaded("x"))
        assert not telemetry.start("gateway.infer", traceparent=unsampled).end(Overloaded("x"))
    finally:
        tracing.configure(tracing.DEFAULT_SAMPLE_RATIO, None)
