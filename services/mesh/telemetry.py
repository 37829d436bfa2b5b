"""Tracing hooks: W3C trace context into and out of link frames, OTLP export when configured.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (spans go there over OTLP) or
`INFERMESH_TRACING=1` (real span contexts, nothing exported). When it is off, `span()` and
`span_from()` hand out one shared no-op span without touching OpenTelemetry at all: even the
API's no-op tracer costs tens of microseconds per hop (context attach/detach, propagators).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_enabled = False
_NO_SPAN: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)


def setup_tracing(service: str) -> None:
    """Install the tracer provider for this process (once), when tracing is configured."""
    global _enabled
    exporting = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if _enabled or not (exporting or os.environ.get("INFERMESH_TRACING") == "1"):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"infermesh-{service}"}))
    if exporting:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True


def enabled() -> bool:
    return _enabled


def inject() -> dict[str, str]:
    """The current trace context as a carrier for a frame (empty when tracing is off)."""
    carrier: dict[str, str] = {}
    if _enabled:
        propagate.inject(carrier)
    return carrier


def span(name: str, tracer_name: str) -> AbstractContextManager[trace.Span]:
    """A span under the current context (the shared no-op span when tracing is off)."""
    if not _enabled:
        return _NO_SPAN
    return trace.get_tracer(tracer_name).start_as_current_span(name)


def span_from(
    carrier: dict[str, str], name: str, tracer_name: str
) -> AbstractContextManager[trace.Span]:
    """A span continuing the trace in `carrier` (a frame's trace context)."""
    if not _enabled:
        return _NO_SPAN
    return _continued(carrier, name, tracer_name)


@contextmanager
def _continued(carrier: dict[str, str], name: str, tracer_name: str) -> Iterator[trace.Span]:
    token = context.attach(propagate.extract(carrier))
    try:
        with trace.get_tracer(tracer_name).start_as_current_span(name) as current:
            yield current
    finally:
        context.detach(token)
