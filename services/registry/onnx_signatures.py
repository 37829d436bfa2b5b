"""Reading a signature out of an ``.onnx`` artifact (the `SignatureReader` of `ports`).

An ONNX graph declares its inputs and outputs with element types and shapes; a symbolic dim
(``batch``) or an unknown one becomes -1. Graph inputs that are also initializers (weights,
in models exported with ``keep_initializers_as_inputs``) are not inputs a caller feeds.
``onnx.load`` parses the whole protobuf (weights included), so it runs in a thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import onnx

from services.mesh.domain.datatypes import DATATYPE_OF_ONNX_ELEMENT
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import Signature, TensorSpec

PLATFORM = "onnxruntime_onnx"


class OnnxSignatureReader:
    """Reads signatures of ``onnxruntime_onnx`` artifacts."""

    def reads(self, platform: str) -> bool:
        """True for ``onnxruntime_onnx``."""
        return platform == PLATFORM

    async def read(self, artifact: Path) -> Signature:
        """The inputs and outputs the ONNX graph at `artifact` declares."""
        return await asyncio.to_thread(read_onnx_signature, artifact)


def read_onnx_signature(artifact: Path) -> Signature:
    """The signature of the ONNX model at `artifact`; InvalidInput when it is not one, or
    declares a tensor the mesh cannot carry (a non-tensor, bfloat16, complex)."""
    try:
        model = onnx.load(str(artifact), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not a model
        raise InvalidInput(
            f"artifact: not a readable ONNX model for platform {PLATFORM} "
            f"({type(exc).__name__})"
        ) from None
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = tuple(_spec(value, "input") for value in graph.input if value.name not in weights)
    outputs = tuple(_spec(value, "output") for value in graph.output)
    if not inputs or not outputs:
        raise InvalidInput("artifact: the ONNX model declares no inputs or no outputs")
    return Signature(inputs, outputs)


def _spec(value: Any, where: str) -> TensorSpec:
    name = value.name
    if not value.type.HasField("tensor_type"):
        raise InvalidInput(f"artifact: ONNX {where} '{name}' is not a tensor")
    tensor = value.type.tensor_type
    datatype = DATATYPE_OF_ONNX_ELEMENT.get(tensor.elem_type)
    if datatype is None:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise InvalidInput(f"artifact: ONNX {where} '{name}' has element type {kind}, "
                           "which has no Open Inference Protocol datatype")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
            for d in tensor.shape.dim]
    return TensorSpec(name, datatype, tuple(dims))
