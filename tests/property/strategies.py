"""Hypothesis strategies shared by the codec property tests: tensors, JSON values, names."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.mesh.domain.tensors import DATATYPES, DTYPES, Tensor

NUMERIC = tuple(DTYPES)
"""Every OIP datatype but BYTES."""

# Text as it arrives in JSON or protobuf: valid Unicode, so no lone surrogates.
text = st.text(st.characters(codec="utf-8"), max_size=12)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)

# orjson reads integers beyond 64 bits as floats and refuses NaN and infinity.
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(text, json_values, max_size=5)

shapes = st.lists(st.integers(0, 4), max_size=4).map(tuple)
"""Shapes of at most 4 dims and 256 elements, zero-size dims included."""


def numpy_dtype(datatype: str, *, little_endian: bool) -> np.dtype[Any]:
    """The numpy dtype of a numeric datatype in the given byte order."""
    dtype = DTYPES[datatype]
    return dtype if dtype.itemsize == 1 else dtype.newbyteorder("<" if little_endian else ">")


def float_width(datatype: str) -> Literal[16, 32, 64]:
    """The width in bits of an FP datatype, as `st.floats(width=...)` takes it."""
    return 16 if datatype == "FP16" else 32 if datatype == "FP32" else 64


@st.composite
def arrays(draw: st.DrawFn, datatype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An array of `datatype` (object array of bytes for BYTES), any byte order, any values."""
    shape = draw(shapes) if shape is None else shape
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=8), min_size=int(np.prod(shape)),
                              max_size=int(np.prod(shape))))
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = numpy_dtype(datatype, little_endian=draw(st.booleans()))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def tensors(draw: st.DrawFn, name: str | None = None) -> Tensor:
    """A tensor of any datatype and shape (zero-size dims included)."""
    datatype = draw(st.sampled_from(DATATYPES))
    return Tensor.from_array(draw(names) if name is None else name, draw(arrays(datatype)))


tensor_lists = st.lists(tensors(), max_size=3)


def same_tensors(got: list[Tensor], want: list[Tensor]) -> bool:
    """Same names, datatypes, shapes and bytes, in order."""
    return [(t.name, t.datatype, t.shape, bytes(t.data)) for t in got] == [
        (t.name, t.datatype, t.shape, bytes(t.data)) for t in want
    ]
