"""The one datatype table of the project: Open Inference Protocol names and what they are in
numpy and in ONNX.

Every hop speaks OIP datatype names (``FP32``, ``INT64``, ...). Tensors on the wire map them to
numpy (`DTYPES`); the ONNX Runtime backend and the registry's reading of ``.onnx`` files map
them to ONNX tensor element types (`ONNX_ELEMENT_TYPES`, the ``TensorProto.DataType`` numbers)
and to the type names ONNX Runtime reports (``tensor(float)``). The numbers are ONNX's stable
enum values, written out so that this module needs neither onnx nor onnxruntime. Torch's
dtypes live beside the TorchScript backend (the domain layer does not import torch) and are
keyed by these names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
"""OIP datatype -> numpy dtype (little-endian, as the OIP binary extension carries them).
BYTES has no fixed-size numpy form and is absent."""

DATATYPES = (*DTYPES, "BYTES")
"""Every OIP datatype the mesh carries."""

ONNX_ELEMENT_TYPES: dict[str, int] = {
    "FP32": 1,
    "UINT8": 2,
    "INT8": 3,
    "UINT16": 4,
    "INT16": 5,
    "INT32": 6,
    "INT64": 7,
    "BYTES": 8,
    "BOOL": 9,
    "FP16": 10,
    "FP64": 11,
    "UINT32": 12,
    "UINT64": 13,
}
"""OIP datatype -> ONNX ``TensorProto.DataType`` (BYTES is ONNX's STRING)."""

DATATYPE_OF_ONNX_ELEMENT: dict[int, str] = {code: name for name, code in
                                            ONNX_ELEMENT_TYPES.items()}
"""ONNX ``TensorProto.DataType`` -> OIP datatype; ONNX types with no OIP name (BFLOAT16,
complex, float8) are absent."""

ORT_TYPE_NAMES: dict[str, str] = {
    "FP32": "tensor(float)",
    "UINT8": "tensor(uint8)",
    "INT8": "tensor(int8)",
    "UINT16": "tensor(uint16)",
    "INT16": "tensor(int16)",
    "INT32": "tensor(int32)",
    "INT64": "tensor(int64)",
    "BYTES": "tensor(string)",
    "BOOL": "tensor(bool)",
    "FP16": "tensor(float16)",
    "FP64": "tensor(double)",
    "UINT32": "tensor(uint32)",
    "UINT64": "tensor(uint64)",
}
"""OIP datatype -> the type name ONNX Runtime gives a session's inputs and outputs."""

DATATYPE_OF_ORT_TYPE: dict[str, str] = {ort: name for name, ort in ORT_TYPE_NAMES.items()}
"""ONNX Runtime type name -> OIP datatype."""
