"""Validating a request against a model version's signature: pure functions, no I/O."""

from __future__ import annotations

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import InferRequest, Signature, TensorSpec


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
    missing = sorted(set(declared) - seen)
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
