"""Validating a request against a model version's signature, and bounding the size of its
body before it is read: pure functions, no I/O.

The body bound (`max_body_bytes`) is what the largest valid request for a version could need,
so memory stays proportional to a valid request whatever a client sends:

    64 KiB                                       (id, parameters, outputs, keys, whitespace)
    + per input: 1 KiB                           (name, datatype, shape, its parameters)
              + rows x elements per row x text   (its data)

rows is the signature's first dimension, or `max_batch_size` where that is -1; elements per
row the product of the other dimensions; text the longest JSON text of one element of the
datatype plus 32 bytes for separators and pretty-printing (`ELEMENT_TEXT`). A BYTES input, or
one with a dynamic dimension past the first, has no bound from its signature: the app's own
maximum body size applies. The same bound holds for the binary extension (a JSON header, then
raw bytes), as an element's raw bytes (at most 8) are fewer than its text.
"""

from __future__ import annotations

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import element_count
from services.mesh.domain.types import InferRequest, ModelVersion, Signature, TensorSpec

BODY_OVERHEAD = 64 << 10
INPUT_OVERHEAD = 1 << 10
_SLACK = 32
ELEMENT_TEXT = {
    "BOOL": 5 + _SLACK,  # false
    "UINT8": 3 + _SLACK, "UINT16": 5 + _SLACK, "UINT32": 10 + _SLACK, "UINT64": 20 + _SLACK,
    "INT8": 4 + _SLACK, "INT16": 6 + _SLACK, "INT32": 11 + _SLACK, "INT64": 20 + _SLACK,
    # -2.2250738585072014e-308: a float64's longest shortest-repr; FP16/FP32 print as float64.
    "FP16": 24 + _SLACK, "FP32": 24 + _SLACK, "FP64": 24 + _SLACK,
}
"""Bytes of JSON text one element of a datatype may take in a valid request body."""


def max_body_bytes(spec: ModelVersion) -> int | None:
    """The largest body a valid inference request for `spec` could need (see the module
    docstring), or None when its signature sets no bound."""
    total = BODY_OVERHEAD
    for tensor in spec.signature.inputs:
        per_element = ELEMENT_TEXT.get(tensor.datatype)
        row_shape = tensor.shape[1:]
        if per_element is None or any(dim < 0 for dim in row_shape):
            return None
        if not tensor.shape:
            rows = 1
        else:
            rows = tensor.shape[0] if tensor.shape[0] >= 0 else spec.batching.max_batch_size
        total += INPUT_OVERHEAD + rows * element_count(row_shape) * per_element
    return total


def check_input(name: str, datatype: str, shape: tuple[int, ...], version: ModelVersion) -> None:
    """Check one input's datatype and shape against `version`'s signature and batch size
    before its data is decoded: a request that cannot be valid costs no conversion.

    An input the signature does not declare passes here: `validate_request` names it, inside
    the request's trace, and its data is bounded by `max_body_bytes` like any other.
    """
    spec = next((s for s in version.signature.inputs if s.name == name), None)
    if spec is None:
        return
    _check_spec(name, datatype, shape, spec)
    _check_not_empty(name, shape)
    max_rows = version.batching.max_batch_size
    if shape and shape[0] > max_rows:
        raise InvalidInput(
            f"input '{name}': batch of {shape[0]} rows exceeds the model's "
            f"max_batch_size {max_rows}"
        )


def validate_request(request: InferRequest, signature: Signature, *, max_rows: int) -> None:
    """Raise InvalidInput naming the first problem: names, datatypes, shapes, sizes, outputs."""
    declared = {spec.name: spec for spec in signature.inputs}
    seen: set[str] = set()
    for tensor in request.inputs:
        spec = declared.get(tensor.name)
        if spec is None:
            raise InvalidInput(
                f"unexpected input '{tensor.name}' for model '{request.model}' "
                f"(expected {', '.join(sorted(declared))})"
            )
        if tensor.name in seen:
            raise InvalidInput(f"input '{tensor.name}' is given more than once")
        seen.add(tensor.name)
        _check_spec(tensor.name, tensor.datatype, tensor.shape, spec)
        _check_not_empty(tensor.name, tensor.shape)
        tensor.check_size()
    missing = sorted(name for name in set(declared) - seen if declared[name].feature is None)
    if missing:
        raise InvalidInput(f"missing input '{missing[0]}' for model '{request.model}'")
    _check_rows(request, max_rows=max_rows)
    _check_outputs(request, signature)


def _check_spec(name: str, datatype: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    if datatype != spec.datatype:
        raise InvalidInput(
            f"input '{name}': datatype {datatype} does not match the model's {spec.datatype}"
        )
    if shape != spec.shape and (
        len(shape) != len(spec.shape)
        or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True))
    ):
        raise InvalidInput(
            f"input '{name}': shape {list(shape)} does not match the model's {list(spec.shape)}"
        )


def _check_not_empty(name: str, shape: tuple[int, ...]) -> None:
    # Refused (400) rather than answered with empty outputs: an empty input is almost always a
    # client bug, and the batcher's row accounting assumes every request carries >= 1 row.
    if shape and shape[0] == 0:
        raise InvalidInput(f"input '{name}': 0 rows; a request carries at least one row")
    if 0 in shape:
        raise InvalidInput(f"input '{name}': shape {list(shape)} has no elements")


def _check_rows(request: InferRequest, *, max_rows: int) -> None:
    rows = {tensor.rows for tensor in request.inputs}
    if len(rows) > 1:
        raise InvalidInput("inputs disagree on the batch dimension (first dim of each shape)")
    if rows and (count := rows.pop()) > max_rows:
        raise InvalidInput(
            f"input '{request.inputs[0].name}': batch of {count} rows exceeds the model's "
            f"max_batch_size {max_rows}"
        )


def _check_outputs(request: InferRequest, signature: Signature) -> None:
    if request.outputs is None:
        return
    names = {spec.name for spec in signature.outputs}
    for wanted in request.outputs:
        if wanted not in names:
            raise InvalidInput(
                f"unknown output '{wanted}' requested (the model has {', '.join(sorted(names))})"
            )
