"""Tracing hooks: W3C trace context into and out of link frames, OTLP export when configured.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (spans go there over OTLP) or
`INFERMESH_TRACING=1` (real span contexts, nothing exported). Otherwise the API's no-op tracer
keeps the hot path free of span bookkeeping, and frames carry an empty trace context.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_configured = False


def setup_tracing(service: str) -> None:
    """Install the tracer provider for this process (once)."""
    global _configured
    if _configured:
        return
    exporting = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if not exporting and os.environ.get("INFERMESH_TRACING") != "1":
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"infermesh-{service}"}))
    if exporting:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject() -> dict[str, str]:
    """The current trace context as a carrier for a frame."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def span_from(carrier: dict[str, str], name: str, tracer_name: str) -> Iterator[trace.Span]:
    """A span continuing the trace in `carrier` (a frame's trace context)."""
    token = context.attach(propagate.extract(carrier))
    try:
        with trace.get_tracer(tracer_name).start_as_current_span(name) as span:
            yield span
    finally:
        context.detach(token)
