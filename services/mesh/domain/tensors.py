"""Tensors as they travel: an Open Inference Protocol datatype, a shape and raw bytes.

Raw bytes are little-endian and C-ordered, as in the OIP binary extension. BYTES tensors hold
each element as a 4-byte little-endian length followed by its bytes (Triton's serialization).
A `Tensor` never copies its buffer: `array()` is a view over `data`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from services.mesh.domain.datatypes import DATATYPES as DATATYPES
from services.mesh.domain.datatypes import DTYPES as DTYPES
from services.mesh.domain.errors import InvalidInput

_OIP_OF_KIND = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}
# The Python types JSON elements may have, by numpy kind; anything else takes the slow path.
_JSON_TYPES: dict[str, frozenset[type]] = {
    "b": frozenset({bool}),
    "i": frozenset({int}),
    "u": frozenset({int}),
    "f": frozenset({int, float}),
}


def element_count(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape (1 for a scalar)."""
    return math.prod(shape)


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array."""
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _OIP_OF_KIND[(array.dtype.kind, array.dtype.itemsize)]
    except KeyError:
        raise InvalidInput(f"unsupported array dtype {array.dtype}") from None


@dataclass(frozen=True, slots=True)
class Tensor:
    """One named tensor; `data` is its raw little-endian C-order bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def rows(self) -> int:
        """Size of the batch dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    def array(self) -> np.ndarray:
        """A read-only numpy view of the tensor (object array for BYTES)."""
        if self.datatype == "BYTES":
            return np.array(deserialize_bytes(self.data), dtype=object).reshape(self.shape)
        return np.frombuffer(self.data, dtype=DTYPES[self.datatype]).reshape(self.shape)

    @classmethod
    def from_array(cls, name: str, array: np.ndarray) -> Tensor:
        """Wrap a numpy array, copying only when it is not C-contiguous little-endian."""
        datatype = datatype_of(array)
        if datatype == "BYTES":
            data = serialize_bytes(array.reshape(-1).tolist())
            return cls(name, datatype, tuple(array.shape), data)
        wanted = DTYPES[datatype]
        contiguous = np.ascontiguousarray(array, dtype=wanted)
        if contiguous.size == 0:  # a memoryview with a zero in its shape cannot be cast
            return cls(name, datatype, tuple(array.shape), b"")
        return cls(name, datatype, tuple(array.shape), contiguous.data.cast("B"))

    def check_size(self) -> None:
        """Raise InvalidInput when the byte size does not match shape × datatype."""
        if any(dim < 0 for dim in self.shape):
            raise InvalidInput(
                f"input '{self.name}': negative dimension in shape {list(self.shape)}"
            )
        if self.datatype == "BYTES":
            count = len(deserialize_bytes(self.data, field=self.name))
            expected = element_count(self.shape)
            if count != expected:
                raise InvalidInput(
                    f"input '{self.name}': {count} BYTES elements for shape "
                    f"{list(self.shape)} ({expected} expected)"
                )
            return
        expected_bytes = element_count(self.shape) * DTYPES[self.datatype].itemsize
        if len(self.data) != expected_bytes:
            raise InvalidInput(
                f"input '{self.name}': {len(self.data)} bytes of data for shape "
                f"{list(self.shape)} and datatype {self.datatype} ({expected_bytes} expected)"
            )


def array_from_json(name: str, datatype: str, data: Any) -> np.ndarray:
    """The JSON `data` (flat or nested lists) of a numeric or BOOL input as a flat array.

    Strict, as JSON datatypes are: numbers in FP tensors (finite, within the type's range),
    integers in range in integer tensors (an integral float such as 2.0 counts), true/false
    in BOOL. InvalidInput names the input and the first offending element, by flat index.
    """
    wanted = DTYPES[datatype]
    try:
        array = _convert(data, wanted)
    except (ValueError, TypeError, OverflowError) as exc:
        return _array_from_json_slowly(name, datatype, data, reason=str(exc))
    # numpy turns "1.5", null and true into numbers; only a look at the types tells.
    if not _JSON_TYPES[wanted.kind].issuperset(map(type, _leaves(data, array.ndim))):
        return _array_from_json_slowly(name, datatype, data, reason="")
    if wanted.kind == "f" and not np.isfinite(array).all():
        return _array_from_json_slowly(name, datatype, data, reason="")
    return array.reshape(-1)


def _convert(data: Any, wanted: np.dtype[Any]) -> np.ndarray:
    if wanted.kind == "f" and wanted.itemsize < 8:
        # Overflow to inf is then caught, with the element named; the cast warning is noise.
        with np.errstate(over="ignore"):
            return np.asarray(data, dtype=wanted)
    return np.asarray(data, dtype=wanted)


def _leaves(data: Any, ndim: int) -> Iterable[Any]:
    if ndim == 0:
        return (data,)
    items: Iterable[Any] = data
    for _ in range(ndim - 1):
        items = chain.from_iterable(items)
    return items


def _array_from_json_slowly(name: str, datatype: str, data: Any, *, reason: str) -> np.ndarray:
    """Name the first offending element, or convert integral floats of integer tensors."""
    if _nested_deeper_than(data, _MAX_DIMS):  # before the recursive walks below
        raise InvalidInput(f"input '{name}': data is nested more than {_MAX_DIMS} lists deep")
    for index, value in enumerate(_walk(data)):
        expected = _element_fault(value, datatype)
        if expected is not None:
            raise InvalidInput(
                f"input '{name}': data[{index}] is {_as_json(value)}, {datatype} takes {expected}"
            )
    try:
        exact = _map_leaves(int, data) if DTYPES[datatype].kind in "iu" else data
        return np.asarray(exact, dtype=DTYPES[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(
            f"input '{name}': data is not valid {datatype}: {reason or exc}"
        ) from None


def _element_fault(value: Any, datatype: str) -> str | None:
    """What `datatype` takes, when `value` is not one of them."""
    dtype = DTYPES[datatype]
    if dtype.kind == "b":
        return None if type(value) is bool else "true or false"
    if type(value) not in (int, float):
        return "numbers" if dtype.kind == "f" else "integers"
    if dtype.kind == "f":
        try:
            with np.errstate(over="ignore"):
                in_range = bool(np.isfinite(dtype.type(value)))
        except OverflowError:
            in_range = False
        return None if in_range else f"numbers within ±{float(np.finfo(dtype).max):g}"
    info = np.iinfo(dtype)
    if (type(value) is float and not value.is_integer()) or not info.min <= value <= info.max:
        return f"integers from {info.min} to {info.max}"
    return None


_MAX_DIMS = 64
"""numpy's most dimensions: data nested deeper is never an array."""


def _nested_deeper_than(data: Any, depth: int) -> bool:
    """Whether `data` holds items in lists nested more than `depth` deep; a level at a time,
    so no nesting exhausts the stack."""
    level = [data]
    for _ in range(depth + 1):
        level = [item for value in level if isinstance(value, list) for item in value]
        if not level:
            return False
    return True


def _walk(data: Any) -> Iterable[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _walk(item)
    else:
        yield data


def _map_leaves(convert: Callable[[Any], Any], data: Any) -> Any:
    if isinstance(data, list):
        return [_map_leaves(convert, item) for item in data]
    return convert(data)


def _as_json(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def serialize_bytes(items: list[Any]) -> bytes:
    """Serialize BYTES elements: each a 4-byte little-endian length and its bytes."""
    parts = []
    for item in items:
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes(data: bytes | memoryview, *, field: str = "tensor") -> list[bytes]:
    """Inverse of `serialize_bytes`; InvalidInput when a length runs past the end."""
    view = memoryview(data)
    items, offset = [], 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput(f"input '{field}': truncated BYTES element length")
        (size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + size > len(view):
            raise InvalidInput(f"input '{field}': BYTES element runs past the end of the data")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    return items


def concat_rows(tensors: list[Tensor]) -> Tensor:
    """Concatenate same-named tensors along the batch dimension (bytes join, no numpy)."""
    first = tensors[0]
    if len(tensors) == 1:
        return first
    rows = sum(t.rows for t in tensors)
    data = b"".join(t.data for t in tensors)
    return Tensor(first.name, first.datatype, (rows, *first.shape[1:]), data)


def split_rows(tensor: Tensor, rows: list[int]) -> list[Tensor]:
    """Split a tensor along the batch dimension into pieces of the given row counts."""
    if len(rows) == 1:
        return [tensor]
    if tensor.datatype == "BYTES":
        array = tensor.array()
        bounds = np.cumsum(rows)[:-1]
        return [Tensor.from_array(tensor.name, part) for part in np.split(array, bounds)]
    row_bytes = len(tensor.data) // max(tensor.rows, 1)
    view = memoryview(tensor.data)
    pieces, offset = [], 0
    for count in rows:
        end = offset + count * row_bytes
        shape = (count, *tensor.shape[1:])
        pieces.append(Tensor(tensor.name, tensor.datatype, shape, view[offset:end]))
        offset = end
    return pieces
