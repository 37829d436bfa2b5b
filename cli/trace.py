"""`infermesh trace REQUEST_ID`: one request's waterfall from the local span files.

`infermesh up` without an OTLP collector writes every service's recorded spans under
`<state dir>/traces` (services/mesh/infra/spanfile.py). This command finds the spans of a
request (by its `infermesh.request_id` attribute), the rest of their trace, and the batch
spans that link to them from another request's trace with whatever ran under those (the
worker's compute), and prints them as a tree on one time axis: the question an SRE asks
Jaeger, answered offline.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.common import print_result
from services.mesh.infra.spanfile import SpanRecord, read_spans
from services.mesh.infra.telemetry import DEFAULT_SAMPLE_RATIO

BAR_WIDTH = 32
_HIDDEN = {"infermesh.request_id"}


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the waterfall."""

    span: SpanRecord
    depth: int
    linked: bool
    """Reached through a span link (a batch that carried this request), not a parent."""


def waterfall(spans: Iterable[SpanRecord], request_id: str) -> list[Row]:
    """The request's spans as a tree in start order; empty when none names the request."""
    spans = list(spans)
    traces = {s.trace_id for s in spans if s.attributes.get("infermesh.request_id") == request_id}
    if not traces:
        return []
    chosen = {s.span_id: s for s in spans if s.trace_id in traces}
    children: dict[str | None, list[tuple[SpanRecord, bool]]] = {}
    for span in spans:
        if span.span_id in chosen and span.trace_id not in traces:
            continue
        linked_to = [link["span_id"] for link in span.links if link["span_id"] in chosen]
        if span.trace_id in traces:
            parent = span.parent_id if span.parent_id in chosen else None
            children.setdefault(parent, []).append((span, False))
        elif linked_to:  # a batch span in another request's trace
            chosen[span.span_id] = span
            children.setdefault(linked_to[0], []).append((span, True))
    _adopt_descendants(spans, chosen, children, traces)
    rows: list[Row] = []
    _walk(children, None, 0, rows, seen=set())
    return rows


def _adopt_descendants(
    spans: list[SpanRecord], chosen: dict[str, SpanRecord],
    children: dict[str | None, list[tuple[SpanRecord, bool]]], traces: set[str],
) -> None:
    """Add the spans under linked batch spans (they live in another trace)."""
    added = True
    while added:
        added = False
        for span in spans:
            if span.span_id in chosen or span.trace_id in traces:
                continue
            if span.parent_id in chosen:
                chosen[span.span_id] = span
                children.setdefault(span.parent_id, []).append((span, False))
                added = True


def _walk(
    children: dict[str | None, list[tuple[SpanRecord, bool]]], parent: str | None, depth: int,
    rows: list[Row], *, seen: set[str],
) -> None:
    for span, linked in sorted(children.get(parent, []), key=lambda item: item[0].start):
        if span.span_id in seen:
            continue
        seen.add(span.span_id)
        rows.append(Row(span, depth, linked))
        _walk(children, span.span_id, depth + 1, rows, seen=seen)


def render(rows: list[Row], request_id: str) -> str:
    """The waterfall as text: offset and duration in ms, the hop, a bar, the attributes."""
    origin = min(r.span.start for r in rows)
    total = max(max(r.span.end for r in rows) - origin, 1)
    services = {_service(r.span) for r in rows}
    root = rows[0].span
    lines = [
        f"request {request_id}  trace {root.trace_id}",
        f"{len(rows)} spans from {len(services)} service{'s' if len(services) > 1 else ''}"
        f" over {total / 1e6:.3f} ms",
        "",
        f"{'START ms':>9} {'DUR ms':>9}  {'HOP':<40} {'0':<{BAR_WIDTH}} {total / 1e6:.2f} ms",
    ]
    for row in rows:
        span = row.span
        hop = "  " * row.depth + ("↪ " if row.linked else "") + span.name + _process(span)
        lines.append(
            f"{(span.start - origin) / 1e6:9.3f} {span.duration_ns / 1e6:9.3f}  {hop:<40} "
            f"{_bar(span.start - origin, span.duration_ns, total)}"
        )
        detail = _attributes(span)
        if span.status.startswith("error"):
            detail = f"{span.status.upper()}  {detail}".strip()
        if row.linked:
            detail = f"(linked: a batch of {span.attributes.get('infermesh.batch_requests', '?')}"\
                     f" requests) {detail}"
        if detail:
            lines.append(f"{'':20}{'  ' * row.depth}  {detail}")
    return "\n".join(lines)


def _service(span: SpanRecord) -> str:
    return span.service.removeprefix("infermesh-") or span.name.split(".")[0]


def _process(span: SpanRecord) -> str:
    """` @process` when the span's service is not the hop its name says (fused mode)."""
    service = _service(span)
    return "" if span.name.startswith(service + ".") else f" @{service}"


def _bar(offset: int, duration: int, total: int) -> str:
    start = min(int(offset / total * BAR_WIDTH), BAR_WIDTH - 1)
    width = max(1, round(duration / total * BAR_WIDTH))
    return (" " * start + "█" * width)[:BAR_WIDTH].ljust(BAR_WIDTH) + "|"


def _attributes(span: SpanRecord) -> str:
    return " ".join(
        f"{key.removeprefix('infermesh.')}={value}"
        for key, value in sorted(span.attributes.items()) if key not in _HIDDEN
    )


def as_json(rows: list[Row], request_id: str) -> dict[str, Any]:
    origin = min(r.span.start for r in rows)
    return {
        "request_id": request_id, "trace_id": rows[0].span.trace_id,
        "spans": [
            {
                "service": _service(r.span), "name": r.span.name, "depth": r.depth,
                "linked": r.linked, "trace_id": r.span.trace_id, "span_id": r.span.span_id,
                "parent_id": r.span.parent_id,
                "start_offset_ms": round((r.span.start - origin) / 1e6, 3),
                "duration_ms": round(r.span.duration_ns / 1e6, 3),
                "status": r.span.status, "attributes": r.span.attributes,
            }
            for r in rows
        ],
    }


def _settled(directory: Path, request_id: str, *, wait: float) -> list[Row]:
    """The waterfall once it stops growing: each service flushes its span file every half
    second, so the hops of a request just served arrive over about a second."""
    deadline = time.monotonic() + wait
    rows: list[Row] = []
    while True:
        found = waterfall(read_spans(directory), request_id)
        if found and len(found) == len(rows):
            return found
        rows = found
        if time.monotonic() >= deadline:
            return rows
        time.sleep(0.6 if rows else 0.25)


def _cmd_trace(args: argparse.Namespace) -> int:
    directory = Path(args.trace_dir or Path(args.state_dir) / "traces")
    rows = _settled(directory, args.request_id, wait=max(args.wait, 0.0))
    if not rows:
        print(
            f"infermesh: error: no spans for request {args.request_id} under {directory}. "
            f"Spans are kept for sampled requests ({DEFAULT_SAMPLE_RATIO:.0%} of new traces by "
            "default, INFERMESH_TRACE_SAMPLE_RATIO), requests that send a sampled "
            "`traceparent: 00-<trace id>-<span id>-01`, and failed requests.",
            file=sys.stderr,
        )
        return 1
    print_result(args, as_json(rows, args.request_id), lambda _: render(rows, args.request_id))
    return 0


def add_trace_command(commands: Any) -> None:
    trace = commands.add_parser(
        "trace", help="print a request's waterfall from the local span files (infermesh up)"
    )
    trace.add_argument("request_id")
    trace.add_argument("--state-dir", default=".infermesh", help="default %(default)s")
    trace.add_argument("--trace-dir", help="span file directory (default: STATE_DIR/traces)")
    trace.add_argument("--wait", type=float, default=3.0,
                       help="seconds to wait for the spans to be flushed (default %(default)s)")
    trace.add_argument("--json", action="store_true", help="machine-readable output")
    trace.set_defaults(run=_cmd_trace)
