"""The local span file: recorded spans as JSON lines, for `infermesh trace` without a collector.

Each process appends to its own `<dir>/<service>-<pid>.jsonl` from the span processor's export
thread (never the event loop). A file past `max_bytes` is renamed to `.jsonl.1` (replacing an
older one) and a new one started, so a process keeps at most twice `max_bytes` of spans.

One line per span: trace and span ids as hex, parent span id (or null), name, service, kind,
start/end in Unix nanoseconds, status ("ok", "unset" or "error: <description>"), attributes,
and links as {trace_id, span_id, attributes}.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

DEFAULT_MAX_BYTES = 64 << 20


class SpanFileExporter(SpanExporter):
    """Appends spans to this process's JSON-lines file under `directory`."""

    def __init__(self, directory: str | Path, service: str, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._directory = Path(directory)
        self._path = self._directory / f"{service}-{os.getpid()}.jsonl"
        self._max_bytes = max_bytes
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        lines = b"".join(orjson.dumps(_record(span)) + b"\n" for span in spans)
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._rotate(len(lines))
            with self._path.open("ab") as out:
                out.write(lines)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _rotate(self, adding: int) -> None:
        try:
            size = self._path.stat().st_size
        except FileNotFoundError:
            return
        if size + adding > self._max_bytes:
            self._path.replace(self._path.with_name(self._path.name + ".1"))

    def shutdown(self) -> None:
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _record(span: ReadableSpan) -> dict[str, Any]:
    context, parent, status = span.context, span.parent, span.status
    assert context is not None
    resource = span.resource.attributes if span.resource is not None else {}
    if status.status_code is StatusCode.ERROR:
        state = f"error: {status.description or ''}".rstrip(": ")
    else:
        state = status.status_code.name.lower()
    return {
        "trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}",
        "parent_id": None if parent is None else f"{parent.span_id:016x}",
        "name": span.name, "service": str(resource.get("service.name", "")),
        "kind": span.kind.name.lower(), "start": span.start_time, "end": span.end_time,
        "status": state, "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}",
             "span_id": f"{link.context.span_id:016x}",
             "attributes": dict(link.attributes or {})}
            for link in span.links
        ],
    }


@dataclass(slots=True)
class SpanRecord:
    """One span read back from a span file."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    service: str
    start: int
    end: int
    status: str
    attributes: dict[str, Any]
    links: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ns(self) -> int:
        return self.end - self.start


def read_spans(directory: str | Path) -> Iterator[SpanRecord]:
    """Every span in the span files under `directory` (rotated ones too); bad lines skipped."""
    root = Path(directory)
    if not root.is_dir():
        return
    for path in sorted(root.glob("*.jsonl*")):
        try:
            content = path.read_bytes()
        except OSError:
            continue
        for line in content.splitlines():
            try:
                raw = orjson.loads(line)
                yield SpanRecord(
                    raw["trace_id"], raw["span_id"], raw["parent_id"], raw["name"],
                    raw["service"], int(raw["start"]), int(raw["end"]), raw["status"],
                    dict(raw["attributes"]), list(raw.get("links", [])),
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut short by a crash, or not ours
