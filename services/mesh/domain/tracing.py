"""Trace context and hop spans: the part of tracing that cores use (pure, standard library).

Each hop opens one `HopSpan` per request (`start`): it continues the trace in the request's
`traceparent` (a client's, or the previous hop's, carried in link frames) or starts a new one,
and hands the next hop a carrier naming itself as the parent (`carrier`). Sampling is decided
once, at the root (`sample_ratio` of new traces) and followed downstream (parent-based); a span
that ends with an error is exported whatever its trace's sampling decision, so errors are
always traced, with one bound: load-shedding answers (`Overloaded`, `QuotaExceeded`,
`DeadlineExceeded`) of unsampled traces are exported at most `SHED_SPANS_PER_SECOND` a second
per process (a burst of as many), the rest not at all (`end` says so; the gateway counts them
and sends no trace id with such an answer). Shedding must be cheap: exporting every span of a
refusal storm cost a gateway ~250 µs of CPU per refused request, about what serving one costs
(2026-12-07, mesh, mlp, 10,000 requests expired on arrival), half of it in the exporting
thread, so refusing more to protect the served made the overload worse.

A span costs two ids, a clock read and a small object until it ends. Where ended spans go is
infrastructure: `services.mesh.infra.telemetry.setup_tracing` installs an exporter here
(`configure`), which turns recorded spans into OpenTelemetry spans off this module.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

DEFAULT_SAMPLE_RATIO = 0.05
TRACEPARENT = "traceparent"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_SAMPLED_FLAGS = frozenset(f"{flags:02x}" for flags in range(256) if flags & 1)

Attribute = str | bool | int | float
SHED_SPANS_PER_SECOND = 20.0
"""Unsampled load-shedding error spans exported per second per process, at most."""
_SHED_CODES = frozenset({"overloaded", "quota_exceeded", "deadline_exceeded"})


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


class _ShedBudget:
    """A token bucket: `rate` spans a second, bursts of `rate`, on `clock`."""

    __slots__ = ("clock", "rate", "stamp", "tokens")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self.tokens, self.stamp = rate, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class _Tracing:
    """The process's tracing state: the root sampling ratio and where ended spans go."""

    def __init__(self) -> None:
        self.ratio = DEFAULT_SAMPLE_RATIO
        self.export: SpanExport | None = None
        self.shed = _ShedBudget(SHED_SPANS_PER_SECOND)


_tracing = _Tracing()


def configure(
    ratio: float, export: SpanExport | None, *, shed_per_second: float = SHED_SPANS_PER_SECOND,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Set the root sampling ratio and the exporter of recorded spans (None: record nothing),
    and the bound on unsampled load-shedding error spans (see the module doc)."""
    _tracing.ratio = ratio
    _tracing.export = export
    _tracing.shed = _ShedBudget(shed_per_second, clock)


def is_shedding(error: BaseException) -> bool:
    """Whether `error` is a load-shedding answer (refused, over quota, past its deadline)."""
    return getattr(error, "code", None) in _SHED_CODES


def recording() -> bool:
    """Whether spans go anywhere in this process."""
    return _tracing.export is not None


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

    def end(self, error: BaseException | None = None, *, end_ns: int | None = None) -> bool:
        """Finish the span: recorded when tracing is configured and it is sampled or failed (a
        load-shedding failure of an unsampled trace within the process's budget). Returns
        whether it was recorded."""
        export = _tracing.export
        if export is None or not (self.context.sampled or error is not None):
            return False
        if (not self.context.sampled and error is not None and is_shedding(error)
                and not _tracing.shed.take()):
            return False
        export(self, error, end_ns or time.time_ns())
        return True


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


SpanExport = Callable[[HopSpan, BaseException | None, int], None]
"""Called with a recorded span, its error (or None) and its end time in ns."""
