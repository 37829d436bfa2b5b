"""Open Inference Protocol v2 JSON ⇄ domain types for the REST adapter. Pure functions.

Input data arrives as JSON lists (flat or nested) and is converted once, here, into raw
tensor bytes; from then on no hop re-encodes it. Every error names the field at fault.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from services.mesh.errors import InvalidInput
from services.mesh.tensors import DATATYPES, DTYPES, Tensor, element_count, serialize_bytes
from services.mesh.types import InferRequest, InferResponse, ModelVersion

_ORJSON_NUMPY = {"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
                 "UINT64", "FP32", "FP64"}


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; InvalidInput when it is not one."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput("request body must be a JSON object")
    return parsed


def decode_infer(
    body: dict[str, Any], *, model: str, version: str | None, request_id: str
) -> InferRequest:
    """An InferRequest from an OIP inference request object."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    client_id = body.get("id")
    if client_id is not None and not isinstance(client_id, str):
        raise InvalidInput("'id' must be a string")
    return InferRequest(
        model=model, version=version, request_id=client_id or request_id,
        inputs=[_decode_input(raw, index) for index, raw in enumerate(inputs)],
        outputs=_decode_outputs(body.get("outputs")), parameters=parameters,
    )


def _decode_input(raw: Any, index: int) -> Tensor:
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
    if "data" not in raw:
        raise InvalidInput(f"input '{name}': 'data' is missing")
    data = _to_bytes(name, datatype, raw["data"], element_count(tuple(shape)))
    return Tensor(name, datatype, tuple(shape), data)


def _to_bytes(name: str, datatype: str, data: Any, expected: int) -> bytes:
    if datatype == "BYTES":
        items = _flatten(data)
        if len(items) != expected:
            raise _count_error(name, len(items), expected)
        return serialize_bytes([i.encode() if isinstance(i, str) else i for i in items])
    try:
        array = np.asarray(data, dtype=DTYPES[datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': data is not valid {datatype}: {exc}") from None
    if array.size != expected:
        raise _count_error(name, array.size, expected)
    return array.tobytes()


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def _count_error(name: str, got: int, expected: int) -> InvalidInput:
    return InvalidInput(f"input '{name}': {got} elements in data, shape needs {expected}")


def _decode_outputs(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(o, dict) and "name" in o for o in raw):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    return [str(o["name"]) for o in raw]


def encode_infer(response: InferResponse) -> bytes:
    """The OIP inference response JSON for a response."""
    body = {
        "model_name": response.model,
        "model_version": response.version,
        "id": response.request_id,
        "parameters": response.parameters,
        "outputs": [_encode_output(t) for t in response.outputs],
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


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
