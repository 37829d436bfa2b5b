"""Open Inference Protocol gRPC messages ⇄ domain types for the gRPC adapter. Pure functions.

The messages are tritonclient's generated classes (`tritonclient.grpc.service_pb2`), so the
wire format is exactly what stock Triton clients speak. Input data arrives either as
`raw_input_contents` (one little-endian buffer per input, in input order) or as typed
`contents` (`fp32_contents`, `int64_contents`, `bytes_contents`, ...) and is converted once,
here, into a `Tensor`; outputs always go back as `raw_output_contents`, which tritonclient
reads by default. Every error names the input at fault.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from services.gateway.rest import add_served_headers
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import DATATYPES, DTYPES, Tensor, serialize_bytes
from services.mesh.domain.types import InferRequest, InferResponse, ModelVersion

# The typed `InferTensorContents` field that carries each datatype (FP16 has none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_MICROSECONDS = 1e-6
_OUTPUT = pb.ModelInferResponse.InferOutputTensor


def decode_infer(message: Any, *, request_id: str, deadline: float | None) -> InferRequest:
    """An InferRequest from a `ModelInferRequest`; `request_id` when the message has no id."""
    raw, tensors = message.raw_input_contents, message.inputs
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"{len(raw)} raw_input_contents for {len(tensors)} inputs "
            "(one per input, in input order, expected)"
        )
    if not tensors:
        raise InvalidInput("'inputs' must be a non-empty list")
    if raw:
        inputs = [_decode_input(tensor, data) for tensor, data in zip(tensors, raw, strict=True)]
    else:
        inputs = [_decode_input(tensor, None) for tensor in tensors]
    parameters = message.parameters
    return InferRequest(
        model=message.model_name, version=message.model_version or None,
        request_id=message.id or request_id, inputs=inputs, deadline=deadline,
        outputs=[output.name for output in message.outputs] or None,
        # Most requests carry none: an empty map's `items()` view still costs a few µs.
        parameters=_decode_parameters(parameters) if parameters else {},
    )


def _decode_input(tensor: Any, raw: bytes | None) -> Tensor:
    name, datatype = tensor.name, tensor.datatype
    if datatype not in DATATYPES:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}")
    shape = tuple(int(dim) for dim in tensor.shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input '{name}': both raw_input_contents and contents given")
        return Tensor(name, datatype, shape, raw)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} data must come in raw_input_contents")
    values = getattr(tensor.contents, field)
    if datatype == "BYTES":
        return Tensor(name, datatype, shape, serialize_bytes(list(values)))
    try:
        data = np.array(values, dtype=DTYPES[datatype]).tobytes()
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"input '{name}': {field} do not fit {datatype}: {exc}") from None
    return Tensor(name, datatype, shape, data)


def _decode_parameters(parameters: Any) -> dict[str, Any]:
    decoded = {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in parameters.items()
        if value.WhichOneof("parameter_choice") is not None
    }
    # Triton's gRPC `timeout` parameter is in microseconds; ours is in seconds.
    if isinstance(decoded.get("timeout"), int) and not isinstance(decoded["timeout"], bool):
        decoded["timeout"] = decoded["timeout"] * _MICROSECONDS
    return decoded


def encode_infer(response: InferResponse) -> Any:
    """A `ModelInferResponse` with every output in `raw_output_contents`."""
    outputs = response.outputs
    message = pb.ModelInferResponse(
        model_name=response.model, model_version=response.version, id=response.request_id,
        # Built whole in the constructor: one call into upb instead of two per output.
        outputs=[_OUTPUT(name=t.name, datatype=t.datatype, shape=t.shape) for t in outputs],
        raw_output_contents=[bytes(t.data) for t in outputs],
    )
    for key, value in response.parameters.items():
        _encode_parameter(message.parameters[key], value)
    return message


def served_metadata(response: InferResponse) -> tuple[tuple[str, str], ...]:
    """The served version, bucket, rollout epoch and fallback as (lower-case) gRPC metadata."""
    headers: dict[str, str] = {}
    add_served_headers(headers, response)
    return tuple((name.lower(), value) for name, value in headers.items())


def _encode_parameter(parameter: Any, value: Any) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def model_metadata(spec: ModelVersion, versions: list[str]) -> Any:
    """A `ModelMetadataResponse` for a model version's signature."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=spec.model, versions=versions, platform=spec.platform,
        inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape)
                for s in spec.signature.inputs],
        outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape)
                 for s in spec.signature.outputs],
    )
