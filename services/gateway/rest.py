"""Open Inference Protocol v2 JSON ⇄ domain types for the REST adapter. Pure functions.

Input data arrives as JSON lists (flat or nested) and is converted once, here, into raw
tensor bytes, or as binary data (see `binary`) that is sliced, not converted; from then on no
hop re-encodes it. Every error names the field at fault.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from services.gateway.binary import OutputFormat, binary_chunks, output_format, split_body
from services.gateway.validation import check_input
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.ids import check_request_id
from services.mesh.domain.tensors import (
    DATATYPES,
    Tensor,
    array_from_json,
    element_count,
    serialize_bytes,
)
from services.mesh.domain.types import InferRequest, InferResponse, ModelVersion
from services.mesh.transport.rest import parse_json_object

_ORJSON_NUMPY = {"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
                 "UINT64", "FP32", "FP64"}


REQUEST_TIMEOUT = "X-Request-Timeout"
"""The REST header giving a request's timeout: seconds, a decimal number (`0.25`)."""


def request_timeout(value: str | None) -> float | None:
    """The seconds an `X-Request-Timeout` header value gives (None when absent); InvalidInput
    naming the header unless it is a positive, finite decimal number."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf or not value.strip().replace(".", "", 1).isdigit():
        raise InvalidInput(
            f"header '{REQUEST_TIMEOUT}': must be a positive decimal number of seconds, "
            f"got {value[:40]!r}"
        )
    return seconds


REQUEST_START = "X-Request-Start"
"""When the edge received the request: `t=<seconds since the epoch>` (nginx's `${msec}`, the
convention of Heroku's router and New Relic). The gateway dates deadlines from it, so the time a
request waited in the edge and in the gateway's accept queue counts against its deadline."""


def request_start(value: str | None) -> float | None:
    """The epoch seconds an `X-Request-Start` header gives (`t=1733540000.123`, or a bare
    number); None when absent or not a number. An infrastructure header: a malformed one is
    ignored, never an error for the client."""
    if not value:
        return None
    text = value.strip().removeprefix("t=")
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def decode_infer_body(
    body: bytes, *, header_length: str | None, model: str, version: str | None, request_id: str,
    spec: ModelVersion | None = None,
) -> tuple[InferRequest, OutputFormat]:
    """The InferRequest in a whole request body (JSON, or JSON then binary tensor data) and
    the output format it asks for; `header_length` is its Inference-Header-Content-Length.
    With `spec`, each input is checked against its signature before its data is decoded."""
    header, tail = split_body(body, header_length)
    parsed = parse_json_object(header)
    request = decode_infer(parsed, model=model, version=version, request_id=request_id,
                           binary=tail, spec=spec)
    return request, output_format(parsed)


def decode_infer(
    body: dict[str, Any], *, model: str, version: str | None, request_id: str,
    binary: memoryview | None = None, spec: ModelVersion | None = None,
) -> InferRequest:
    """An InferRequest from an OIP inference request object and its binary tail, if any.

    The body's `id`, when it has one, is the request's id (checked first, before any tensor
    is decoded); otherwise `request_id`. With `spec`, each input's name, datatype and shape
    are checked against the signature (and `max_batch_size`) before its data is converted.
    """
    client_id = body.get("id")
    if client_id is not None and not isinstance(client_id, str):
        raise InvalidInput("'id' must be a string")
    if client_id:
        check_request_id(client_id, field="id")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    # How outputs are encoded is this adapter's business, not the model's.
    parameters = {k: v for k, v in parameters.items() if k != "binary_data_output"}
    chunks = binary_chunks(inputs, binary if binary is not None else memoryview(b""))
    return InferRequest(
        model=model, version=version, request_id=client_id or request_id,
        inputs=[_decode_input(raw, index, chunk, spec) for index, (raw, chunk)
                in enumerate(zip(inputs, chunks, strict=True))],
        outputs=_decode_outputs(body.get("outputs")), parameters=parameters,
    )


def _decode_input(
    raw: Any, index: int, chunk: memoryview | None, spec: ModelVersion | None
) -> Tensor:
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}]: 'name' must be a non-empty string")
    datatype, shape = raw.get("datatype"), raw.get("shape")
    if datatype not in DATATYPES:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    if spec is not None:
        check_input(name, datatype, tuple(shape), spec)
    if chunk is not None:
        return Tensor(name, datatype, tuple(shape), chunk)
    if "data" not in raw:
        raise InvalidInput(f"input '{name}': 'data' is missing")
    data = _to_bytes(name, datatype, raw["data"], tuple(shape))
    return Tensor(name, datatype, tuple(shape), data)


def _to_bytes(name: str, datatype: str, data: Any, shape: tuple[int, ...]) -> bytes:
    expected = element_count(shape)
    if isinstance(data, list) and len(data) > expected:  # flat or nested: never more items
        raise _count_error(name, len(data), expected)
    if datatype == "BYTES":
        items = _flatten(name, data, rank=len(shape))
        if len(items) != expected:
            raise _count_error(name, len(items), expected)
        return serialize_bytes([i.encode() if isinstance(i, str) else i for i in items])
    array = array_from_json(name, datatype, data)
    if array.size != expected:
        raise _count_error(name, array.size, expected)
    return array.tobytes()


def _flatten(name: str, data: Any, *, rank: int) -> list[Any]:
    """The elements of flat or nested `data`, nested at most `rank` lists deep; a level at a
    time, so no nesting depth can exhaust the stack."""
    items = [data]
    for _ in range(max(rank, 1)):
        items = [item for level in items
                 for item in (level if isinstance(level, list) else (level,))]
    if any(isinstance(item, list) for item in items):
        raise InvalidInput(
            f"input '{name}': data is nested deeper than its shape's {max(rank, 1)} "
            f"dimension(s)"
        )
    return items


def _count_error(name: str, got: int, expected: int) -> InvalidInput:
    return InvalidInput(f"input '{name}': {got} elements in data, shape needs {expected}")


def _decode_outputs(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(o, dict) and "name" in o for o in raw):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    return [str(o["name"]) for o in raw]


def encode_infer(response: InferResponse) -> bytes:
    """The OIP inference response JSON for a response, every output as JSON data."""
    body, _ = encode_infer_parts(response, OutputFormat())
    return body


def encode_infer_parts(
    response: InferResponse, output_format: OutputFormat
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header."""
    binary = [t for t in response.outputs if output_format.is_binary(t.name)]
    header = orjson.dumps({
        "model_name": response.model,
        "model_version": response.version,
        "id": response.request_id,
        "parameters": response.parameters,
        "outputs": [_encode_binary_output(t) if output_format.is_binary(t.name)
                    else _encode_output(t) for t in response.outputs],
    }, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, None
    return b"".join([header, *(t.data for t in binary)]), len(header)


SERVED_PARAMETERS = (
    ("bucket", "Infermesh-Bucket"), ("rollout_epoch", "Infermesh-Rollout-Epoch"),
    ("trace_id", "Infermesh-Trace-Id"), ("cache", "Infermesh-Cache"),
)


def add_served_headers(headers: dict[str, str], response: InferResponse) -> None:
    """Name the version that served, its bucket, rollout epoch, trace, fallback and how the
    prediction cache served it (`hit`, `miss`, `coalesced`) in `headers`."""
    headers["Infermesh-Model-Version"] = response.version
    parameters = response.parameters
    if not parameters:
        return
    for key, name in SERVED_PARAMETERS:
        if key in parameters:
            headers[name] = str(parameters[key])
    if parameters.get("fallback") is True:
        headers["Infermesh-Fallback"] = "true"


def _encode_binary_output(tensor: Tensor) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
            "parameters": {"binary_data_size": memoryview(tensor.data).nbytes}}


def _encode_output(tensor: Tensor) -> dict[str, Any]:
    array = tensor.array().reshape(-1)
    if tensor.datatype in _ORJSON_NUMPY:
        data: Any = array
    elif tensor.datatype == "BYTES":
        data = [_text(item) for item in array.tolist()]
    else:
        data = array.tolist()
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
            "data": data}


def _text(item: bytes) -> str:
    try:
        return item.decode()
    except UnicodeDecodeError:
        return item.hex()


def model_metadata(spec: ModelVersion, versions: list[str]) -> dict[str, Any]:
    """OIP model metadata response object."""
    return {
        "name": spec.model,
        "versions": versions,
        "platform": spec.platform,
        "inputs": [s.to_json() for s in spec.signature.inputs],
        "outputs": [s.to_json() for s in spec.signature.outputs],
    }
