"""Properties of the tensor codec: arrays round-trip through `Tensor` in any byte order and
layout, and strict JSON decoding (`array_from_json`) accepts exactly the values a datatype
takes, refusing everything else with InvalidInput naming the input."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import DATATYPES, DTYPES, Tensor, array_from_json
from tests.property.strategies import (
    NUMERIC,
    arrays,
    float_width,
    json_values,
    names,
    shapes,
)

# -- Tensor.from_array / Tensor.array ---------------------------------------------------------


@given(st.sampled_from(DATATYPES).flatmap(arrays), names)
def test_an_array_round_trips_through_a_tensor(array: np.ndarray, name: str) -> None:
    tensor = Tensor.from_array(name, array)
    back = tensor.array()
    tensor.check_size()
    assert (tensor.shape, back.shape) == (array.shape, array.shape)
    if tensor.datatype == "BYTES":
        assert back.tolist() == array.tolist()
        return
    # Raw data is little-endian whatever the array's byte order; values are kept bit for bit.
    assert back.dtype == DTYPES[tensor.datatype]
    assert bytes(tensor.data) == array.astype(back.dtype).tobytes()
    assert np.array_equal(back, array, equal_nan=array.dtype.kind == "f")


@given(st.sampled_from(NUMERIC).flatmap(lambda dt: arrays(dt, (3, 4))),
       st.sampled_from(["transpose", "every other column", "reversed rows"]))
def test_a_strided_array_round_trips(array: np.ndarray, view: str) -> None:
    strided = {"transpose": array.T, "every other column": array[:, ::2],
               "reversed rows": array[::-1]}[view]
    back = Tensor.from_array("x", strided).array()
    assert back.shape == strided.shape
    assert back.tobytes() == np.ascontiguousarray(strided, dtype=back.dtype).tobytes()


# -- array_from_json ---------------------------------------------------------------------------


def _finite_in(datatype: str) -> st.SearchStrategy[Any]:
    """Numbers an FP tensor takes: finite, and finite once rounded to the datatype."""
    dtype = DTYPES[datatype]
    top = float(np.finfo(dtype).max)
    return st.integers(-int(top), int(top)) | st.floats(-top, top, width=float_width(datatype))


def valid_elements(datatype: str) -> st.SearchStrategy[Any]:
    dtype = DTYPES[datatype]
    if dtype.kind == "b":
        return st.booleans()
    if dtype.kind == "f":
        return _finite_in(datatype)
    info = np.iinfo(dtype)
    # An integral float counts as an integer (JSON does not tell 2 from 2.0), when it is exact.
    exact_floats = st.integers(max(info.min, -(2**53)), min(info.max, 2**53)).map(float)
    return st.integers(info.min, info.max) | exact_floats


def invalid_elements(datatype: str) -> st.SearchStrategy[Any]:
    """Values `datatype` refuses."""
    dtype = DTYPES[datatype]
    wrong_kind: st.SearchStrategy[Any] = st.none() | st.text(max_size=5) | st.builds(dict)
    if dtype.kind == "b":
        return wrong_kind | st.integers() | st.floats()
    if dtype.kind == "f":
        too_big = float(np.finfo(dtype).max) * 2
        out_of_range = st.floats(min_value=too_big) | st.floats(max_value=-too_big)
        return wrong_kind | st.booleans() | out_of_range | st.just(10**400) | st.just(math.nan)
    info = np.iinfo(dtype)
    return (
        wrong_kind | st.booleans() | st.integers(max_value=info.min - 1)
        | st.integers(min_value=info.max + 1)
        | st.floats(allow_nan=True).filter(lambda f: not f.is_integer())
    )


def nested(elements: st.SearchStrategy[Any], shape: tuple[int, ...]) -> st.SearchStrategy[Any]:
    """JSON data of `shape`: lists nested as deep as the shape (a bare element for a scalar)."""
    if not shape:
        return elements
    return st.lists(nested(elements, shape[1:]), min_size=shape[0], max_size=shape[0])


def _expected(datatype: str, data: Any, shape: tuple[int, ...]) -> np.ndarray:
    exact = [int(x) for x in _leaves(data)] if DTYPES[datatype].kind in "iu" else _leaves(data)
    return np.array(exact, dtype=DTYPES[datatype]).reshape(-1)


def _leaves(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [leaf for item in data for leaf in _leaves(item)]
    return [data]


def _datatype_data_shape(
    elements: Any = valid_elements,
) -> st.SearchStrategy[tuple[str, Any, tuple[int, ...]]]:
    return st.tuples(st.sampled_from(NUMERIC), shapes).flatmap(
        lambda ds: st.tuples(st.just(ds[0]), nested(elements(ds[0]), ds[1]), st.just(ds[1]))
    )


@given(_datatype_data_shape(), st.booleans())
def test_valid_json_data_is_taken_nested_or_flat(
    case: tuple[str, Any, tuple[int, ...]], flat: bool
) -> None:
    datatype, data, shape = case
    data = _leaves(data) if flat and shape else data
    got = array_from_json("x", datatype, data)
    assert got.dtype == DTYPES[datatype]
    assert got.tobytes() == _expected(datatype, data, shape).tobytes()


@given(_datatype_data_shape(), names, st.data())
def test_one_invalid_element_is_invalid_input_naming_the_input(
    case: tuple[str, Any, tuple[int, ...]], name: str, data: st.DataObject
) -> None:
    datatype, values, shape = case
    flat = _leaves(values) if shape else []
    if not flat:
        flat = [None]
    index = data.draw(st.integers(0, len(flat) - 1), label="index")
    flat[index] = data.draw(invalid_elements(datatype), label="invalid")
    with pytest.raises(InvalidInput, match=f"input '{_escaped(name)}'"):
        array_from_json(name, datatype, flat)


@given(_datatype_data_shape(), names, st.data())
def test_ragged_data_is_invalid_input(
    case: tuple[str, Any, tuple[int, ...]], name: str, data: st.DataObject
) -> None:
    datatype, values, shape = case
    flat = _leaves(values) if shape else [values]
    ragged = [flat, [*flat, data.draw(valid_elements(datatype), label="one more")]]
    with pytest.raises(InvalidInput, match=f"input '{_escaped(name)}'"):
        array_from_json(name, datatype, ragged)


@given(st.sampled_from(NUMERIC), json_values)
def test_any_json_is_taken_exactly_when_every_element_is_valid(
    datatype: str, data: Any
) -> None:
    try:
        got = array_from_json("x", datatype, data)
    except InvalidInput as exc:
        assert "input 'x'" in str(exc)
        assert not _takes(datatype, data)
    else:
        assert _takes(datatype, data)
        assert got.tobytes() == _expected(datatype, data, ()).tobytes()


def _takes(datatype: str, data: Any) -> bool:
    """The oracle: rectangular nested lists whose every leaf `datatype` takes."""
    return _rectangular(data) and all(_valid(datatype, leaf) for leaf in _leaves(data))


def _rectangular(data: Any) -> bool:
    if not isinstance(data, list):
        return True
    if any(isinstance(item, list) for item in data):
        return all(isinstance(item, list) for item in data) and len(
            {_outer_shape(item) for item in data}) == 1 and all(map(_rectangular, data))
    return True


def _outer_shape(data: Any) -> tuple[int, ...]:
    shape = []
    while isinstance(data, list):
        shape.append(len(data))
        if not data:
            break
        data = data[0]
    return tuple(shape)


def _valid(datatype: str, value: Any) -> bool:
    dtype = DTYPES[datatype]
    if dtype.kind == "b":
        return type(value) is bool
    if type(value) not in (int, float):
        return False
    if dtype.kind == "f":
        top = float(np.finfo(dtype).max)
        # Rounding to the datatype: halfway past the largest finite value rounds to infinity.
        ulp = top - float(np.nextafter(dtype.type(top), dtype.type(0)))
        return bool(abs(value) < top + ulp / 2)
    info = np.iinfo(dtype)
    return (type(value) is int or float(value).is_integer()) and info.min <= value <= info.max


def _escaped(name: str) -> str:
    return re.escape(name)


# Not a hypothesis test: hypothesis raises the recursion limit while a test runs, which would
# hide a RecursionError from data nested 1000 deep (issue 13, row 7).
@pytest.mark.parametrize("datatype", ["BOOL", "INT64", "FP32"])
@pytest.mark.parametrize("depth", [1, 64, 65, 1000, 5000])
def test_data_nested_past_numpys_64_dimensions_is_invalid_input(
    datatype: str, depth: int
) -> None:
    element: Any = True if datatype == "BOOL" else 1.0  # an integral float takes the slow path
    data = element
    for _ in range(depth):
        data = [data]
    if depth <= 64:
        assert array_from_json("deep", datatype, data).tolist() == [element]
    else:
        with pytest.raises(InvalidInput, match="input 'deep': data is nested more than 64"):
            array_from_json("deep", datatype, data)
