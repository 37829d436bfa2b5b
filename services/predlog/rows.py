"""Prediction log rows: what the router keeps of a prediction, and the table row it becomes.

A `PredictionRecord` is made on the request path and holds references only (the request's
input tensors and the response's outputs, never copies or encodings). `to_row` runs later, off
the request path, and applies the version's policy:

    full    inputs/outputs as JSON: [{name, datatype, shape, data}] with `data` flat, as in an
            OIP request body (BYTES elements as UTF-8 strings)
    digest  {tensor name: "sha256:<hex of its raw bytes>"} for inputs and outputs
    none    NULL inputs, outputs and label

`label` is what a report compares with feedback: for the first output, the argmax along the
last axis when it is a 2-D float tensor with at least two columns (class scores), else the
value itself when there is one per row (a 1-D tensor or one column); several rows are joined
with commas. Anything else (higher rank, no rows) has no label.

Every row fits what the table and its indexes accept, whatever the client sent: `request_id`,
`tenant`, `model` and `version` are at most `MAX_KEY_CHARS` characters and `label` at most
`MAX_LABEL_CHARS` (a longer value keeps its head, then `#` and the first 16 hex digits of the
sha256 of the whole value, so distinct long values stay distinct and a cut one is recognisable);
`inputs` or `outputs` whose `full` JSON passes `MAX_FULL_JSON_CHARS` are stored as their digest
instead (an object, where `full` is a list). Text holds no NUL and no lone surrogate.

A row's `ts` is an aware UTC datetime at microsecond precision (what timestamptz keeps), so a
row spilled to disk (`encode_rows`, as epoch microseconds) reads back (`decode_row`) equal.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import orjson

from services.mesh.domain.predictions import FULL, NONE
from services.mesh.domain.tensors import DTYPES, Tensor, deserialize_bytes
from services.mesh.domain.tracing import parse_traceparent

COLUMNS = (
    "ts", "request_id", "tenant", "model", "version", "bucket", "shadow", "latency_ms",
    "trace_id", "label", "inputs", "outputs", "features", "cache",
)
"""The `predictions` columns, in table order (the staging table is `LIKE predictions`)."""

Row = tuple[
    datetime, str, str, str, str, int | None, bool, float, str | None, str | None, str | None,
    str | None, str | None, str | None,
]
"""One table row; inputs, outputs and features are JSON text."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

MAX_KEY_CHARS = 256
"""Most characters kept of request_id, tenant, model and version: indexed columns, and a btree
entry must stay under ~2.7 kB (at most 4 UTF-8 bytes a character: four keys fit)."""
MAX_LABEL_CHARS = 4096
"""Most characters kept of a label (not indexed: bounded so one row stays small)."""
MAX_FULL_JSON_CHARS = 1 << 20
"""Most characters of `full` inputs (or outputs) JSON; beyond it they are stored as digests."""
_CUT_MARK_CHARS = 17
"""`#` and 16 hex digits, what a cut value ends with."""

class PredictionRecord(NamedTuple):
    """One served prediction as the router saw it; tensors are referenced, not copied.

    A named tuple: the cheapest object to build on the request path (a fraction of a µs).
    """

    ts: float
    """Wall-clock time (`time.time()`) the router received the request."""
    request_id: str
    tenant: str
    model: str
    version: str
    bucket: Any
    shadow: bool
    latency_ms: float
    traceparent: str | None
    policy: str
    inputs: Sequence[Tensor]
    outputs: Sequence[Tensor]
    features: Mapping[str, str] | None = None
    """{feature name: status} of the features the router filled (`domain.features`)."""
    cache: str | None = None
    """How the prediction cache served it (`hit`, `miss`, `coalesced`); None: not cached."""

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data this record holds (how heavy its conversion is)."""
        return sum(len(t.data) for t in self.inputs) + sum(len(t.data) for t in self.outputs)


def to_row(record: PredictionRecord) -> Row:
    """The table row of `record` under its policy (CPU-bound for big tensors: run off the loop)."""
    inputs: str | None
    outputs: str | None
    if record.policy == FULL:
        inputs, outputs = _bounded_full(record.inputs), _bounded_full(record.outputs)
    elif record.policy == NONE:
        inputs = outputs = None
    else:
        inputs, outputs = digest_json(record.inputs), digest_json(record.outputs)
    bucket = record.bucket if type(record.bucket) is int else None
    label = None if record.policy == NONE else label_of(record.outputs)
    return (
        EPOCH + timedelta(microseconds=round(record.ts * 1_000_000)),
        _key(record.request_id), _key(record.tenant), _key(record.model),
        _key(record.version), bucket, record.shadow, float(record.latency_ms),
        trace_id_of(record.traceparent),
        None if label is None else _bounded(label, MAX_LABEL_CHARS),
        inputs, outputs, _features_json(record.features),
        None if record.cache is None else _bounded(_clean(str(record.cache)), 16),
    )


def _features_json(features: Mapping[str, str] | None) -> str | None:
    if not isinstance(features, Mapping):
        return None
    return orjson.dumps({_clean(str(k)): _clean(str(v)) for k, v in features.items()}).decode()


def _key(text: str) -> str:
    return _bounded(_clean(text), MAX_KEY_CHARS)


def _bounded(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else its head, `#` and a digest of it."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:_CUT_MARK_CHARS - 1]
    return f"{text[:limit - _CUT_MARK_CHARS]}#{digest}"


def _bounded_full(tensors: Sequence[Tensor]) -> str:
    text = full_json(tensors)
    return text if len(text) <= MAX_FULL_JSON_CHARS else digest_json(tensors)


def full_json(tensors: Sequence[Tensor]) -> str:
    """The tensors as JSON text: a list of {name, datatype, shape, data (flat)}."""
    return orjson.dumps(
        [_tensor_json(t) for t in tensors], option=orjson.OPT_SERIALIZE_NUMPY
    ).decode()


def _tensor_json(tensor: Tensor) -> dict[str, Any]:
    data: Any
    if tensor.datatype == "BYTES":
        data = [_clean(item.decode("utf-8", "replace")) for item in deserialize_bytes(tensor.data)]
    else:
        data = np.frombuffer(tensor.data, dtype=DTYPES[tensor.datatype])
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
    return {"name": _clean(tensor.name), "datatype": tensor.datatype,
            "shape": list(tensor.shape), "data": data}


def digest_json(tensors: Sequence[Tensor]) -> str:
    """{tensor name: "sha256:<hex>"} of each tensor's raw bytes, as JSON text."""
    return orjson.dumps(
        {_clean(t.name): "sha256:" + hashlib.sha256(t.data).hexdigest() for t in tensors}
    ).decode()


def label_of(outputs: Sequence[Tensor]) -> str | None:
    """The predicted class or value of each row of the first output, comma-joined."""
    if not outputs:
        return None
    first = outputs[0]
    if first.datatype == "FP32" and len(first.shape) == 2 and first.shape[0] == 1:
        label = _row_argmax(first.data, first.shape[1])
        if label is not None:
            return label
    try:
        array = first.array()
    except ValueError:
        return None  # data size does not match the shape
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim == 2 and array.dtype.kind == "f" and array.shape[1] >= 2:
        values = [str(i) for i in array.argmax(axis=-1).tolist()]
    elif array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1):
        values = _texts(array.reshape(-1))
    else:
        return None
    return ",".join(values) if values else None


def _row_argmax(data: bytes | memoryview, width: int) -> str | None:
    """`label_of` a one-row [1, width] FP32 output (most answers are one row) without numpy,
    about half its cost; None to leave it to numpy (a size mismatch, a NaN, a big-endian host).
    Like numpy's argmax, the first of equal maxima wins."""
    if width < 2 or len(data) != 4 * width or not _LITTLE_ENDIAN:
        return None
    try:
        values = memoryview(data).cast("B").cast("f")
    except (TypeError, ValueError):
        return None
    row = values.tolist()
    total = sum(row)
    if total != total:
        return None  # a NaN (or inf - inf): numpy's argmax picks the first NaN, max() would not
    return str(row.index(max(row)))


_LITTLE_ENDIAN = sys.byteorder == "little"
"""FP32 tensor bytes are little-endian; `_row_argmax` reads them in native order."""


def _texts(flat: np.ndarray) -> list[str]:
    if flat.dtype == object:
        return [_clean(bytes(v).decode("utf-8", "replace")) for v in flat]
    if flat.dtype.kind == "b":
        return ["true" if v else "false" for v in flat.tolist()]
    return [str(v) for v in flat]  # numpy scalars: shortest text of their own precision


def _clean(text: str) -> str:
    """`text` as Postgres text and jsonb accept it: no NUL, no lone surrogates."""
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def encode_rows(rows: Sequence[Row]) -> list[bytes]:
    """One JSON line per row (ts as epoch microseconds), for the spool."""
    return [orjson.dumps([_micros(row[0]), *row[1:]]) + b"\n" for row in rows]


def decode_row(line: bytes) -> Row:
    """The row of a spool line; ValueError when the line is not one."""
    try:
        fields = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    while isinstance(fields, list) and len(COLUMNS) - 2 <= len(fields) < len(COLUMNS):
        fields.append(None)  # spilled before the features (and cache) columns existed
    if not isinstance(fields, list) or len(fields) != len(COLUMNS) or type(fields[0]) is not int:
        raise ValueError("not a prediction row")
    ts = EPOCH + timedelta(microseconds=fields[0])
    return (ts, *fields[1:])


def _micros(ts: datetime) -> int:
    delta = ts - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex trace id of a W3C `traceparent`; None when absent or malformed."""
    context = parse_traceparent(traceparent)
    return None if context is None else context.trace_id
