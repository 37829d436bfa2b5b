"""Tracing: W3C trace context on every hop; spans recorded for sampled requests and for errors.

Each hop opens one `HopSpan` per request (`start`): it continues the trace in the request's
`traceparent` (a client's, or the previous hop's, carried in link frames) or starts a new one,
and hands the next hop a carrier naming itself as the parent (`carrier`). Sampling is decided
once, at the root (`sample_ratio` of new traces) and followed downstream (parent-based); a span
that ends with an error is exported whatever its trace's sampling decision, so errors are
always traced.

A span costs two ids, a clock read and a small object until it ends; only a recorded span is
turned into an OpenTelemetry `ReadableSpan` and given to the batch span processors (OTLP, the
local span file), which encode and export it on their own thread. We do not go through the
OpenTelemetry tracer API on the hot path: its context attach/detach and propagators cost tens of
microseconds per hop even for unsampled requests, and our hops already carry the context.

Configured from the environment by `setup_tracing` (see docs/TRACING.md):
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and
`OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, the default, or `http/protobuf`) export over OTLP;
`INFERMESH_TRACE_DIR` writes spans as JSON lines under that directory (`infermesh trace` reads
them); `INFERMESH_TRACE_SAMPLE_RATIO` (default 0.05) samples new traces.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

# The span model lives in the domain layer (cores use it); re-exported here for adapters.
from services.mesh.domain.tracing import (
    CONSUMER,
    DEFAULT_SAMPLE_RATIO,
    INTERNAL,
    SERVER,
    TRACEPARENT,
    HopSpan,
    Link,
    TraceContext,
    configure,
    links_of,
    parse_traceparent,
    recording,
    sample_ratio,
    start,
    start_batch,
    trace_id_of,
)

__all__ = [
    "CONSUMER", "DEFAULT_SAMPLE_RATIO", "INTERNAL", "SERVER", "SETTINGS", "TRACEPARENT",
    "HopSpan", "Link", "TraceContext", "flush", "links_of", "parse_traceparent", "recording",
    "sample_ratio", "setup_tracing", "shutdown_tracing", "start", "start_batch", "trace_id_of",
]

log = logging.getLogger(__name__)

SETTINGS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "INFERMESH_TRACE_DIR", "INFERMESH_TRACE_SAMPLE_RATIO", "OTEL_TRACES_SAMPLER_ARG",
)
"""The environment variables `setup_tracing` reads (besides the exporters' own `OTEL_*`)."""


class _Sink(Protocol):
    def on_end(self, span: Any) -> None: ...
    def shutdown(self) -> None: ...
    def force_flush(self, timeout_millis: int = ...) -> bool: ...


class _Tracing:
    """The process's tracing configuration: where recorded spans go and the root sampling."""

    def __init__(self) -> None:
        self.service = "infermesh"
        self.sinks: list[_Sink] = []
        self.resource: Any = None
        self.scope: Any = None


_tracing = _Tracing()


def setup_tracing(
    service: str, env: Mapping[str, str] | None = None, *, sinks: Sequence[_Sink] = ()
) -> None:
    """Configure this process's tracing from `env` (default `os.environ`); idempotent.

    `sinks` adds span processors (tests pass an in-memory one)."""
    env = os.environ if env is None else env
    _tracing.service = f"infermesh-{service}"
    ratio = _ratio(env)
    configure(ratio, None)
    new_sinks: list[_Sink] = list(sinks)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if endpoint:
        new_sinks.append(_batch(_otlp_exporter(env)))
    trace_dir = env.get("INFERMESH_TRACE_DIR")
    if trace_dir:
        from services.mesh.infra.spanfile import SpanFileExporter

        # Flushed twice a second, so `infermesh trace` finds a request just served.
        new_sinks.append(_batch(SpanFileExporter(trace_dir, service), delay_ms=500))
    shutdown_tracing()
    if not new_sinks:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    _tracing.resource = Resource.create({"service.name": _tracing.service})
    _tracing.scope = InstrumentationScope("infermesh")
    _tracing.sinks = new_sinks
    configure(ratio, _emit)
    if not getattr(_tracing, "_atexit", False):
        atexit.register(shutdown_tracing)
        _tracing._atexit = True  # type: ignore[attr-defined]


def _ratio(env: Mapping[str, str]) -> float:
    raw = env.get("INFERMESH_TRACE_SAMPLE_RATIO") or env.get("OTEL_TRACES_SAMPLER_ARG")
    if raw is None:
        return DEFAULT_SAMPLE_RATIO
    try:
        ratio = float(raw)
    except ValueError:
        log.warning("INFERMESH_TRACE_SAMPLE_RATIO=%r is not a number; using %s", raw,
                    DEFAULT_SAMPLE_RATIO)
        return DEFAULT_SAMPLE_RATIO
    return min(max(ratio, 0.0), 1.0)


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    """The OTLP exporter `env` asks for, given its endpoint explicitly (the exporters would
    otherwise read `os.environ` themselves, whatever `env` says)."""
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        # The signal path is appended to the generic endpoint only (the OTLP spec's rule).
        return HttpExporter(endpoint=traces or f"{base.rstrip('/')}/v1/traces")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    endpoint = traces or base
    return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


def _batch(exporter: Any, *, delay_ms: float | None = None) -> _Sink:
    """A batch processor for `exporter` (its delay and queue bound from `OTEL_BSP_*` unless
    given: 5 s and 2,048 spans by default; spans beyond the bound are dropped, not waited on)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    processor: _Sink = BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms)
    return processor


def shutdown_tracing() -> None:
    """Flush and stop the span processors (at exit, or before reconfiguring)."""
    sinks, _tracing.sinks = _tracing.sinks, []
    configure(sample_ratio(), None)
    for sink in sinks:
        try:
            sink.shutdown()
        except Exception:  # pragma: no cover - an exporter failing at exit must not mask more
            log.exception("span processor failed to shut down")


def flush(timeout: float = 5.0) -> None:
    """Export what the span processors hold now (tests; shutdown does it too)."""
    for sink in _tracing.sinks:
        sink.force_flush(int(timeout * 1000))


def _emit(hop: HopSpan, error: BaseException | None, end_ns: int) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Status, StatusCode

    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
    context = trace.SpanContext(int(hop.context.trace_id, 16), int(hop.context.span_id, 16),
                                False, flags)
    parent = None
    if hop.parent is not None:
        parent = trace.SpanContext(int(hop.parent.trace_id, 16), int(hop.parent.span_id, 16),
                                   True, flags)
    attributes = dict(hop.attributes)
    status = Status(StatusCode.UNSET)
    if error is not None:
        code = getattr(error, "code", None) or type(error).__name__
        attributes["error.type"] = str(code)
        status = Status(StatusCode.ERROR, f"{code}: {error}"[:512])
    links = [
        trace.Link(
            trace.SpanContext(int(link.trace_id, 16), int(link.span_id, 16), True,
                              flags if link.sampled else trace.TraceFlags(0)),
            dict(link.attributes),
        )
        for link in links_of(hop, failed=error is not None)
    ]
    span = ReadableSpan(
        hop.name, context=context, parent=parent, resource=_tracing.resource,
        attributes=attributes, links=links, kind=trace.SpanKind(hop.kind), status=status,
        start_time=hop.start_ns, end_time=end_ns, instrumentation_scope=_tracing.scope,
    )
    for sink in _tracing.sinks:
        sink.on_end(span)
