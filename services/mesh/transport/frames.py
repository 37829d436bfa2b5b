"""Binary link frames and the codec between domain types and frames.

One WebSocket message carries one or more frames back to back. A frame is

    header   16 bytes, little-endian: kind u8, flags u8, reserved u16, call id u32,
             metadata length u32, payload length u32
    metadata orjson object: the operation, model, version, tenant, deadline, lane, trace
             context and one descriptor [name, datatype, shape, nbytes] per tensor
    payload  the tensors' raw bytes, back to back in descriptor order

Tensors are never re-encoded between hops: a receiver slices the payload into memoryviews.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchResult, InferRequest, InferResponse

HEADER = struct.Struct("<BBHIII")
CALL, REPLY, ERROR, CANCEL = 1, 2, 3, 4

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
        offset += HEADER.size
        end_meta = offset + meta_len
        end = end_meta + payload_len
        if end > len(view):
            raise InvalidInput("link frame: lengths run past the end of the message")
        try:
            meta = orjson.loads(view[offset:end_meta])
        except orjson.JSONDecodeError:
            raise InvalidInput("link frame: metadata is not JSON") from None
        yield Frame(kind, call_id, meta, view[end_meta:end])
        offset = end


def _describe(tensors: list[Tensor]) -> tuple[list[list[Any]], Buffers]:
    descriptors = [[t.name, t.datatype, list(t.shape), len(t.data)] for t in tensors]
    return descriptors, [t.data for t in tensors]


def _tensors(descriptors: list[list[Any]], payload: memoryview) -> list[Tensor]:
    tensors, offset = [], 0
    for name, datatype, shape, nbytes in descriptors:
        tensors.append(Tensor(name, datatype, tuple(shape), payload[offset : offset + nbytes]))
        offset += nbytes
    return tensors


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
        model=meta["model"], inputs=_tensors(meta["tensors"], payload),
        request_id=meta["id"], version=meta["version"], tenant=meta["tenant"],
        deadline=meta["deadline"], lane=meta["lane"], outputs=meta["outputs"],
        parameters=meta["params"], trace=meta["trace"], bucket=meta.get("bucket"),
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
        model=meta["model"], version=meta["version"], request_id=meta["id"],
        outputs=_tensors(meta["tensors"], payload), parameters=meta["params"],
    )


def encode_batch(batch: Batch) -> tuple[dict[str, Any], Buffers]:
    descriptors, buffers = _describe(batch.inputs)
    meta = {
        "op": "batch", "model": batch.model, "version": batch.version, "rows": batch.rows,
        "trace": batch.trace, "outputs": batch.outputs, "tensors": descriptors,
    }
    return meta, buffers


def decode_batch(meta: dict[str, Any], payload: memoryview) -> Batch:
    return Batch(
        model=meta["model"], version=meta["version"],
        inputs=_tensors(meta["tensors"], payload), rows=meta["rows"], trace=meta["trace"],
        outputs=meta.get("outputs"),
    )


def encode_batch_result(result: BatchResult) -> tuple[dict[str, Any], Buffers]:
    descriptors, buffers = _describe(result.outputs)
    return {"device": result.device, "tensors": descriptors}, buffers


def decode_batch_result(meta: dict[str, Any], payload: memoryview) -> BatchResult:
    return BatchResult(outputs=_tensors(meta["tensors"], payload), device=meta["device"])
