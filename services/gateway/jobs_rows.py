"""A job's rows at rest: each row's request decoded and checked against the signature at
submission, then stored as a small JSON header and its tensors' raw bytes.

Stored as the JSON the client sent, every row was parsed again when it ran: `orjson.loads`, then
each number of each tensor converted, about 11 µs of the gateway's loop a row, the largest part
of a job's gateway CPU and time taken from the realtime requests beside it. Stored this way a
row costs about 3 µs: its tensors are views of the stored bytes. (A link frame would do too, but
its codec checks a dozen fields a row that mean nothing here: 8 µs.)

    magic     b"IMJR1\\n" (the format and its version; JSON never starts so)
    length    u32 little-endian: the header's bytes
    header    JSON {"id": the id the row was sent with or "", "outputs": [...] | null,
              "parameters": {...}, "tensors": [[name, datatype, shape, nbytes], ...]}
    payload   the tensors' raw bytes, back to back in header order

The tenant, deadline, lane and trace are the run's, not the submission's; a row without an id
of its own is named after the job and the row when it runs. A row stored as JSON (a job
submitted before this format) still runs.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from services.gateway.rest import decode_infer
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import DATATYPES, DTYPES, Tensor, element_count
from services.mesh.domain.types import InferRequest, ModelVersion
from services.mesh.transport.rest import parse_json_object

MAGIC = b"IMJR1\n"
LENGTH = struct.Struct("<I")
START = len(MAGIC) + LENGTH.size


def encode_row(request: InferRequest) -> bytes:
    """The stored form of a row's decoded, checked request."""
    header = orjson.dumps({
        "id": request.request_id, "outputs": request.outputs, "parameters": request.parameters,
        "tensors": [[t.name, t.datatype, list(t.shape), memoryview(t.data).nbytes]
                    for t in request.inputs],
    })
    return b"".join([MAGIC, LENGTH.pack(len(header)), header, *(t.data for t in request.inputs)])


def decode_row(
    raw: bytes, *, model: str, version: str | None, request_id: str,
    spec: ModelVersion | None = None,
) -> InferRequest:
    """The request of a stored row, to run for `model` and `version` under its own id or else
    `request_id`; InvalidInput when it does not decode. `spec` checks a row stored as JSON as
    it decodes (the gateway core checks every request against the signature again)."""
    if not raw.startswith(MAGIC):
        return decode_infer(parse_json_object(raw), model=model, version=version,
                            request_id=request_id, spec=spec)
    view = memoryview(raw)
    if len(view) < START or len(view) < START + (length := LENGTH.unpack_from(view, len(MAGIC))[0]):
        raise InvalidInput("stored row: truncated")
    try:
        header = orjson.loads(view[START:START + length])
        row_id, outputs, parameters = header["id"], header["outputs"], header["parameters"]
        inputs = _tensors(header["tensors"], view[START + length:])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise InvalidInput("stored row: malformed header") from None
    if not isinstance(row_id, str) or not isinstance(parameters, dict) or not (
        outputs is None or isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
    ):
        raise InvalidInput("stored row: malformed header")
    return InferRequest(model=model, version=version, inputs=inputs,
                        request_id=row_id or request_id, outputs=outputs, parameters=parameters)


def _tensors(descriptors: list[Any], payload: memoryview) -> list[Tensor]:
    tensors, offset = [], 0
    for name, datatype, shape, nbytes in descriptors:
        if datatype not in DATATYPES or datatype != "BYTES" and (
            nbytes != element_count(tuple(shape)) * DTYPES[datatype].itemsize
        ):
            raise ValueError(name)
        tensors.append(Tensor(name, datatype, tuple(shape), payload[offset:offset + nbytes]))
        offset += nbytes
    if offset != len(payload):
        raise ValueError("payload")
    return tensors
