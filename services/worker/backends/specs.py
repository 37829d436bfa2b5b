"""A signature's tensors as a backend checks them: numpy dtype, shape, dummy warm-up rows.

Shared by backends that need no torch (ONNX Runtime); the datatypes come from the project's
one table, :data:`services.mesh.domain.datatypes.DTYPES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.mesh.domain.datatypes import DTYPES
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import Signature
from services.worker.backends.base import BackendError


def parse_signature(signature: Signature | Mapping[str, Any]) -> Signature:
    """`signature` as the typed record; a JSON form is parsed, its faults a BackendError."""
    if isinstance(signature, Signature):
        return signature
    try:
        return Signature.from_json(signature)
    except InvalidInput as exc:
        raise BackendError(str(exc)) from None


@dataclass(frozen=True)
class BackendTensor:
    """One signature entry: name, OIP datatype, numpy dtype, shape (-1 for dynamic dims)."""

    name: str
    datatype: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, datatype: str, shape: Sequence[int]) -> BackendTensor:
        """Check one entry: a numeric datatype and a shape of a batch dim plus dims >= 1 or -1."""
        if datatype not in DTYPES:
            raise BackendError(f"tensor {name!r}: datatype {datatype!r} is not supported")
        if not shape or any(not isinstance(d, int) or d < -1 or d == 0 for d in shape):
            raise BackendError(f"tensor {name!r}: bad shape {list(shape)}")
        return cls(name, datatype, DTYPES[datatype], tuple(shape))

    def dummy(self, batch_size: int) -> npt.NDArray[Any]:
        """Zeros shaped like this tensor, with ``batch_size`` rows and dynamic dims set to 1."""
        dims = [batch_size] + [d if d > 0 else 1 for d in self.shape[1:]]
        return np.zeros(dims, dtype=self.dtype)

    def input_array(self, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
        """This input out of ``inputs`` as a C-contiguous array of its dtype (a safe cast)."""
        if self.name not in inputs:
            raise BackendError(f"missing input {self.name!r}; got {sorted(inputs)}")
        try:
            array = np.asarray(inputs[self.name]).astype(self.dtype, casting="safe", copy=False)
        except TypeError as exc:
            raise BackendError(f"input {self.name!r}: {exc}") from exc
        if not _fits(self.shape[1:], array.shape[1:]) or len(array.shape) != len(self.shape):
            raise BackendError(
                f"input {self.name!r} has shape {list(array.shape)}, "
                f"signature says {list(self.shape)}"
            )
        return np.ascontiguousarray(array)

    def check_output(self, array: npt.NDArray[Any], batch_size: int) -> None:
        """Raise :class:`BackendError` if a model output disagrees with this spec."""
        expected = (batch_size, *self.shape[1:])
        if len(array.shape) != len(expected) or not _fits(expected, array.shape):
            raise BackendError(
                f"output {self.name!r} has shape {list(array.shape)}, expected {list(expected)}"
            )
        if array.dtype != self.dtype:
            raise BackendError(
                f"output {self.name!r} has dtype {array.dtype}, signature says {self.datatype}"
            )


def tensors_of(signature: Signature) -> tuple[list[BackendTensor], list[BackendTensor]]:
    """The checked inputs and outputs of `signature`."""
    inputs = [BackendTensor.of(s.name, s.datatype, s.shape) for s in signature.inputs]
    outputs = [BackendTensor.of(s.name, s.datatype, s.shape) for s in signature.outputs]
    return inputs, outputs


def batch_size(specs: Sequence[BackendTensor], arrays: Sequence[npt.NDArray[Any]]) -> int:
    """The rows every input has; BackendError when they disagree."""
    sizes: dict[str, int] = {s.name: a.shape[0] for s, a in zip(specs, arrays, strict=True)}
    if len(set(sizes.values())) != 1:
        raise BackendError(f"inputs disagree on batch size: {sizes}")
    return next(iter(sizes.values()))


def _fits(wanted: Sequence[int], got: Sequence[int]) -> bool:
    return len(wanted) == len(got) and all(w in (-1, g) for w, g in zip(wanted, got, strict=True))
