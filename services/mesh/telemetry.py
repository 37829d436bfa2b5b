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
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_RATIO = 0.05
SETTINGS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "INFERMESH_TRACE_DIR", "INFERMESH_TRACE_SAMPLE_RATIO", "OTEL_TRACES_SAMPLER_ARG",
)
"""The environment variables `setup_tracing` reads (besides the exporters' own `OTEL_*`)."""
TRACEPARENT = "traceparent"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_SAMPLED_FLAGS = frozenset(f"{flags:02x}" for flags in range(256) if flags & 1)

Attribute = str | bool | int | float


class _Sink(Protocol):
    def on_end(self, span: Any) -> None: ...
    def shutdown(self) -> None: ...
    def force_flush(self, timeout_millis: int = ...) -> bool: ...


class TraceContext(NamedTuple):
    """What a `traceparent` says: the trace, the parent span in it, the sampling decision.

    Ids are kept as the lower-case hex a `traceparent` carries, so a hop parses and forwards
    them without converting (a named tuple: made for every request at every hop)."""

    trace_id: str
    """32 hex digits."""
    span_id: str
    """16 hex digits."""
    sampled: bool

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The context in a W3C `traceparent` value; None when absent or malformed (the W3C rule:
    an invalid header is ignored and a new trace starts)."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:  # rare: upper case, surrounding blanks, or not a traceparent at all
        match = _TRACEPARENT.fullmatch(value.strip().lower())
        if match is None:
            return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, flags in _SAMPLED_FLAGS)


def trace_id_of(carrier: Mapping[str, str]) -> str | None:
    """The 32-hex trace id in a carrier's `traceparent` (None when it has none)."""
    context = parse_traceparent(carrier.get(TRACEPARENT))
    return None if context is None else context.trace_id


def _new_id(bits: int) -> str:
    """A random non-zero id as hex (`bits` / 4 digits)."""
    return f"{random.getrandbits(bits) or 1:0{bits // 4}x}"


class _Tracing:
    """The process's tracing configuration: where recorded spans go and the root sampling."""

    def __init__(self) -> None:
        self.service = "infermesh"
        self.ratio = DEFAULT_SAMPLE_RATIO
        self.sinks: list[_Sink] = []
        self.resource: Any = None
        self.scope: Any = None

    @property
    def recording(self) -> bool:
        return bool(self.sinks)


_tracing = _Tracing()


def setup_tracing(
    service: str, env: Mapping[str, str] | None = None, *, sinks: Sequence[_Sink] = ()
) -> None:
    """Configure this process's tracing from `env` (default `os.environ`); idempotent.

    `sinks` adds span processors (tests pass an in-memory one)."""
    env = os.environ if env is None else env
    _tracing.service = f"infermesh-{service}"
    _tracing.ratio = _ratio(env)
    new_sinks: list[_Sink] = list(sinks)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if endpoint:
        new_sinks.append(_batch(_otlp_exporter(env)))
    trace_dir = env.get("INFERMESH_TRACE_DIR")
    if trace_dir:
        from services.mesh.spanfile import SpanFileExporter

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
    for sink in sinks:
        try:
            sink.shutdown()
        except Exception:  # pragma: no cover - an exporter failing at exit must not mask more
            log.exception("span processor failed to shut down")


def flush(timeout: float = 5.0) -> None:
    """Export what the span processors hold now (tests; shutdown does it too)."""
    for sink in _tracing.sinks:
        sink.force_flush(int(timeout * 1000))


def recording() -> bool:
    """Whether spans go anywhere in this process."""
    return _tracing.recording


def sample_ratio() -> float:
    return _tracing.ratio


@dataclass(frozen=True, slots=True)
class Link:
    """A link from a span to another span (a batch to each of its member requests)."""

    trace_id: str
    span_id: str
    sampled: bool
    attributes: Mapping[str, Attribute]


class HopSpan:
    """One hop's span of one request (or batch): ids now, an exported span only if recorded."""

    __slots__ = ("attributes", "context", "kind", "members", "name", "parent", "start_ns")

    def __init__(self, name: str, context: TraceContext, parent: TraceContext | None,
                 kind: int) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.start_ns = time.time_ns()
        self.attributes: dict[str, Attribute] = {}
        self.members: Sequence[HopSpan] = ()
        """For a batch span: the member requests' spans, linked when it is exported."""

    @property
    def trace_id(self) -> str:
        """This span's trace id as 32 hex digits (what responses and logs report)."""
        return self.context.trace_id

    @property
    def sampled(self) -> bool:
        return self.context.sampled

    def set(self, key: str, value: Attribute | None) -> None:
        if value is not None:
            self.attributes[key] = value

    def carrier(self) -> dict[str, str]:
        """The trace context for the next hop: this span is its parent."""
        return {TRACEPARENT: self.context.traceparent()}

    def link(self) -> Link:
        """A link to this span (for a batch span)."""
        return Link(self.context.trace_id, self.context.span_id, self.context.sampled,
                    {"infermesh.request_id": str(self.attributes.get("infermesh.request_id", ""))})

    def end(self, error: BaseException | None = None, *, end_ns: int | None = None) -> None:
        """Finish the span: recorded when tracing is configured and it is sampled or failed."""
        if not _tracing.sinks or not (self.context.sampled or error is not None):
            return
        _emit(self, error, end_ns or time.time_ns())


SERVER, INTERNAL, CONSUMER = 1, 0, 4
"""OpenTelemetry span kinds (values of `opentelemetry.trace.SpanKind`)."""


def start(name: str, carrier: Mapping[str, str] | None = None, *, kind: int = INTERNAL,
          traceparent: str | None = None) -> HopSpan:
    """Open a span continuing `carrier`'s trace (or `traceparent`), else a new sampled-or-not
    trace."""
    raw = traceparent if traceparent is not None else (
        carrier.get(TRACEPARENT) if carrier else None
    )
    parent = parse_traceparent(raw)
    span_id = _new_id(64)
    if parent is None:
        sampled = _tracing.ratio >= 1.0 or random.random() < _tracing.ratio
        context = TraceContext(_new_id(128), span_id, sampled)
    else:
        context = TraceContext(parent.trace_id, span_id, parent.sampled)
    return HopSpan(name, context, parent, kind)


def start_batch(name: str, members: Sequence[HopSpan]) -> HopSpan:
    """A span for a batch of requests: a child of the first sampled member (so the batch and the
    worker below it appear in that request's trace). Sampled when any member is.

    Exported, it links to every member span that is recorded too: the sampled members' (every
    member at ratio 1.0), or all of them when the batch failed (its members fail with it, and
    failed spans are always recorded). Links are built only then: a batch of 32 would
    otherwise make and encode 32 links for spans that are mostly never exported."""
    sampled = [m for m in members if m.sampled]
    parent = (sampled or list(members))[0].context
    span = HopSpan(name, TraceContext(parent.trace_id, _new_id(64), bool(sampled)), parent,
                   INTERNAL)
    span.members = members
    return span


def links_of(hop: HopSpan, *, failed: bool) -> list[Link]:
    """The links an exported batch span carries (see `start_batch`)."""
    return [m.link() for m in hop.members if failed or m.context.sampled]


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
