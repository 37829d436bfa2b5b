"""Binary link frames and the codec between domain types and frames.

One WebSocket message carries one or more frames back to back (`split_messages` keeps each
message under a size limit, never cutting a frame). A frame is

    header   16 bytes, little-endian: kind u8, flags u8, reserved u16, call id u32,
             metadata length u32, payload length u32
    metadata orjson object: the operation, model, version, tenant, deadline, lane, trace
             context and one descriptor [name, datatype, shape, nbytes] per tensor
    payload  the tensors' raw bytes, back to back in descriptor order

Tensors are never re-encoded between hops: a receiver slices the payload into memoryviews.
A message or metadata that is not what this module writes (a truncated or corrupt frame, a
missing or mistyped field, descriptors that do not add up to the payload) is InvalidInput.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import DATATYPES, DTYPES, Tensor, element_count
from services.mesh.domain.types import Batch, BatchResult, InferRequest, InferResponse

HEADER = struct.Struct("<BBHIII")
CALL, REPLY, ERROR, CANCEL = 1, 2, 3, 4
KINDS = frozenset({CALL, REPLY, ERROR, CANCEL})

Buffers = list[bytes | memoryview]


@dataclass(slots=True)
class Frame:
    kind: int
    call_id: int
    meta: dict[str, Any]
    payload: memoryview


def pack(
    kind: int, call_id: int, meta: dict[str, Any], buffers: Sequence[bytes | memoryview] = ()
) -> Buffers:
    """The parts of one frame; join them (with other frames) into one message."""
    meta_bytes = orjson.dumps(meta)
    payload_len = sum(len(b) for b in buffers)
    return [HEADER.pack(kind, 0, 0, call_id, len(meta_bytes), payload_len), meta_bytes, *buffers]


def unpack(message: bytes) -> Iterator[Frame]:
    """The frames in one message; payloads are views into `message`."""
    view = memoryview(message)
    offset = 0
    while offset < len(view):
        if offset + HEADER.size > len(view):
            raise InvalidInput("link frame: truncated header")
        kind, _, _, call_id, meta_len, payload_len = HEADER.unpack_from(view, offset)
        if kind not in KINDS:
            raise InvalidInput(f"link frame: unknown kind {kind}")
        offset += HEADER.size
        end_meta = offset + meta_len
        end = end_meta + payload_len
        if end > len(view):
            raise InvalidInput("link frame: lengths run past the end of the message")
        try:
            meta = orjson.loads(view[offset:end_meta])
        except orjson.JSONDecodeError:
            raise InvalidInput("link frame: metadata is not JSON") from None
        if not isinstance(meta, dict):
            raise InvalidInput("link frame: metadata is not a JSON object")
        yield Frame(kind, call_id, meta, view[end_meta:end])
        offset = end


def split_messages(joined: bytes, limit: int) -> list[bytes | memoryview]:
    """`joined` (frames back to back, as `pack` writes them) as messages of at most `limit`
    bytes: frames go back to back until the next would pass the limit; a frame larger than
    the limit goes alone. Frames are never cut, and the common case (all of it fits) costs
    nothing: only an oversized message is walked, header by header, into views."""
    if len(joined) <= limit:
        return [joined]
    view = memoryview(joined)
    messages: list[bytes | memoryview] = []
    start = offset = 0
    while offset < len(view):
        _, _, _, _, meta_len, payload_len = HEADER.unpack_from(view, offset)
        end = offset + HEADER.size + meta_len + payload_len
        if end - start > limit and offset > start:
            messages.append(view[start:offset])
            start = offset
        offset = end
    messages.append(view[start:])
    return messages


def _describe(tensors: list[Tensor]) -> tuple[list[list[Any]], Buffers]:
    descriptors = [[t.name, t.datatype, list(t.shape), len(t.data)] for t in tensors]
    return descriptors, [t.data for t in tensors]


_MISSING: Any = object()


def _field(
    meta: dict[str, Any], key: str, kinds: type | tuple[type, ...], *,
    nullable: bool = False, default: Any = _MISSING,
) -> Any:
    """`meta[key]` when it is one of `kinds` (or None, when nullable); bool is no int here."""
    value = meta.get(key, default)
    if type(value) is kinds:  # the common case, checked at once (bool is never `kinds`)
        return value
    if value is _MISSING:
        raise InvalidInput(f"link frame: metadata has no '{key}'")
    if value is None and nullable:
        return None
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise InvalidInput(f"link frame: metadata '{key}' is {type(value).__name__}")
    return value


def _items(
    meta: dict[str, Any], key: str, kind: type, *, nullable: bool = False,
    default: Any = _MISSING,
) -> Any:
    """`meta[key]` when it is a list of `kind` (None when nullable)."""
    value = _field(meta, key, list, nullable=nullable, default=default)
    if value is not None and not all(
        isinstance(item, kind) and not isinstance(item, bool) for item in value
    ):
        raise InvalidInput(f"link frame: metadata '{key}' holds an item not {kind.__name__}")
    return value


def _trace(meta: dict[str, Any]) -> dict[str, str]:
    trace: dict[str, Any] = _field(meta, "trace", dict)
    if not all(isinstance(value, str) for value in trace.values()):
        raise InvalidInput("link frame: metadata 'trace' holds a value that is not a string")
    return trace


def _tensors(meta: dict[str, Any], payload: memoryview) -> list[Tensor]:
    tensors, offset = [], 0
    for descriptor in _items(meta, "tensors", list):
        name, datatype, shape, nbytes = _descriptor(descriptor)
        if offset + nbytes > len(payload):
            raise InvalidInput(f"link frame: tensor '{name}' runs past the end of the payload")
        tensors.append(Tensor(name, datatype, shape, payload[offset : offset + nbytes]))
        offset += nbytes
    if offset != len(payload):
        raise InvalidInput(f"link frame: {len(payload) - offset} payload bytes after the tensors")
    return tensors


def _descriptor(descriptor: list[Any]) -> tuple[str, str, tuple[int, ...], int]:
    """A tensor descriptor [name, datatype, shape, nbytes], checked against itself."""
    if len(descriptor) != 4:
        raise InvalidInput("link frame: a tensor descriptor is not [name, datatype, shape, nbytes]")
    name, datatype, shape, nbytes = descriptor
    if not (
        isinstance(name, str) and datatype in DATATYPES and isinstance(shape, list)
        and all(type(dim) is int and dim >= 0 for dim in shape)
        and type(nbytes) is int and nbytes >= 0
    ):
        raise InvalidInput(f"link frame: malformed tensor descriptor {descriptor!r:.80}")
    if datatype != "BYTES" and nbytes != element_count(tuple(shape)) * DTYPES[datatype].itemsize:
        raise InvalidInput(f"link frame: tensor '{name}' has {nbytes} bytes for shape {shape}")
    return name, datatype, tuple(shape), nbytes


def encode_request(request: InferRequest) -> tuple[dict[str, Any], Buffers]:
    descriptors, buffers = _describe(request.inputs)
    meta = {
        "op": "infer", "model": request.model, "version": request.version,
        "id": request.request_id, "tenant": request.tenant, "deadline": request.deadline,
        "lane": request.lane, "outputs": request.outputs, "params": request.parameters,
        "trace": request.trace, "bucket": request.bucket, "tensors": descriptors,
    }
    return meta, buffers


def decode_request(meta: dict[str, Any], payload: memoryview) -> InferRequest:
    return InferRequest(
        model=_field(meta, "model", str), inputs=_tensors(meta, payload),
        request_id=_field(meta, "id", str), version=_field(meta, "version", str, nullable=True),
        tenant=_field(meta, "tenant", str),
        deadline=_field(meta, "deadline", (int, float), nullable=True),
        lane=_field(meta, "lane", str), outputs=_items(meta, "outputs", str, nullable=True),
        parameters=_field(meta, "params", dict), trace=_trace(meta),
        bucket=_field(meta, "bucket", int, nullable=True, default=None),
    )


def encode_response(response: InferResponse) -> tuple[dict[str, Any], Buffers]:
    descriptors, buffers = _describe(response.outputs)
    meta = {
        "model": response.model, "version": response.version, "id": response.request_id,
        "params": response.parameters, "tensors": descriptors,
    }
    return meta, buffers


def decode_response(meta: dict[str, Any], payload: memoryview) -> InferResponse:
    return InferResponse(
        model=_field(meta, "model", str), version=_field(meta, "version", str),
        request_id=_field(meta, "id", str), outputs=_tensors(meta, payload),
        parameters=_field(meta, "params", dict),
    )


def encode_batch(batch: Batch) -> tuple[dict[str, Any], Buffers]:
    descriptors, buffers = _describe(batch.inputs)
    meta = {
        "op": "batch", "model": batch.model, "version": batch.version, "rows": batch.rows,
        "trace": batch.trace, "outputs": batch.outputs, "deadline": batch.deadline,
        "tensors": descriptors,
    }
    return meta, buffers


def decode_batch(meta: dict[str, Any], payload: memoryview) -> Batch:
    return Batch(
        model=_field(meta, "model", str), version=_field(meta, "version", str),
        inputs=_tensors(meta, payload), rows=_items(meta, "rows", int), trace=_trace(meta),
        outputs=_items(meta, "outputs", str, nullable=True, default=None),
        deadline=_field(meta, "deadline", (int, float), nullable=True, default=None),
    )


def encode_batch_result(result: BatchResult) -> tuple[dict[str, Any], Buffers]:
    descriptors, buffers = _describe(result.outputs)
    return {"device": result.device, "tensors": descriptors}, buffers


def decode_batch_result(meta: dict[str, Any], payload: memoryview) -> BatchResult:
    return BatchResult(outputs=_tensors(meta, payload), device=_field(meta, "device", str))
