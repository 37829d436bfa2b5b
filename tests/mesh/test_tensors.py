from __future__ import annotations

import numpy as np
import pytest

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import (
    DTYPES,
    Tensor,
    array_from_json,
    concat_rows,
    datatype_of,
    deserialize_bytes,
    serialize_bytes,
    split_rows,
)


def _sample(datatype: str) -> np.ndarray:
    values = np.arange(12).reshape(3, 4)
    if datatype == "BOOL":
        return np.asarray(values % 2 == 0)
    return values.astype(DTYPES[datatype])


@pytest.mark.parametrize("datatype", sorted(DTYPES))
def test_from_array_and_array_round_trip_every_datatype(datatype: str) -> None:
    original = _sample(datatype)
    tensor = Tensor.from_array("x", original)
    assert tensor.datatype == datatype
    assert tensor.shape == (3, 4)
    assert tensor.rows == 3
    tensor.check_size()
    back = tensor.array()
    assert back.dtype == DTYPES[datatype]
    np.testing.assert_array_equal(back, original)
    assert bytes(tensor.data) == original.astype(DTYPES[datatype]).tobytes()


def test_from_array_takes_an_empty_array() -> None:
    """A model may return zero rows; wrapping them must not fail on the memoryview cast."""
    tensor = Tensor.from_array("y", np.zeros((0, 2), dtype=np.float32))
    assert (tensor.shape, tensor.data, tensor.array().shape) == ((0, 2), b"", (0, 2))


def test_from_array_accepts_non_contiguous_and_big_endian_arrays() -> None:
    transposed = np.arange(6, dtype=">i4").reshape(2, 3).T
    tensor = Tensor.from_array("x", transposed)
    assert tensor.datatype == "INT32"
    np.testing.assert_array_equal(tensor.array(), transposed)
    assert bytes(tensor.data) == np.ascontiguousarray(transposed, dtype="<i4").tobytes()


def test_bytes_tensor_round_trips_strings_and_raw_bytes() -> None:
    original = np.array([[b"a", b""], [b"\x00\xff", "h\u00e9".encode()]], dtype=object)
    tensor = Tensor.from_array("text", original)
    assert tensor.datatype == "BYTES"
    assert tensor.shape == (2, 2)
    tensor.check_size()
    np.testing.assert_array_equal(tensor.array(), original)

    strings = Tensor.from_array("text", np.array(["hi", "h\u00e9"]))
    assert strings.datatype == "BYTES"
    assert list(strings.array()) == [b"hi", "h\u00e9".encode()]


def test_serialize_bytes_is_length_prefixed_little_endian() -> None:
    assert serialize_bytes([b"ab", "c"]) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert deserialize_bytes(b"\x02\x00\x00\x00ab\x01\x00\x00\x00c") == [b"ab", b"c"]
    assert deserialize_bytes(b"") == []


def test_unsupported_dtype_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="complex"):
        datatype_of(np.zeros(2, dtype=np.complex64))


def test_check_size_names_the_input_when_bytes_are_short() -> None:
    tensor = Tensor("pixels", "FP32", (2, 3), b"\x00" * 20)
    with pytest.raises(InvalidInput, match=r"input 'pixels': 20 bytes .*\(24 expected\)"):
        tensor.check_size()


def test_check_size_names_the_input_on_negative_dimension() -> None:
    with pytest.raises(InvalidInput, match="input 'ids': negative dimension"):
        Tensor("ids", "INT64", (-1, 2), b"").check_size()


def test_check_size_names_the_input_on_wrong_bytes_element_count() -> None:
    tensor = Tensor("words", "BYTES", (3,), serialize_bytes([b"a", b"b"]))
    with pytest.raises(InvalidInput, match=r"input 'words': 2 BYTES elements .*\(3 expected\)"):
        tensor.check_size()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x01\x00", "truncated BYTES element length"),
        (b"\x05\x00\x00\x00abc", "runs past the end"),
        (serialize_bytes([b"ok"]) + b"\x01", "truncated BYTES element length"),
    ],
)
def test_deserialize_truncated_bytes_is_invalid_input(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        deserialize_bytes(data, field="words")
    with pytest.raises(InvalidInput, match=f"input 'words': .*{problem}"):
        Tensor("words", "BYTES", (1,), data).check_size()


@pytest.mark.parametrize("datatype", ["FP32", "INT8", "BOOL", "FP64"])
def test_split_rows_inverts_concat_rows(datatype: str) -> None:
    parts = [
        Tensor.from_array("x", _sample(datatype)[:1]),
        Tensor.from_array("x", _sample(datatype)[1:3]),
        Tensor.from_array("x", _sample(datatype)[:2]),
    ]
    joined = concat_rows(parts)
    assert joined.shape == (5, 4)
    joined.check_size()
    pieces = split_rows(joined, [1, 2, 2])
    assert [p.shape for p in pieces] == [(1, 4), (2, 4), (2, 4)]
    for piece, part in zip(pieces, parts, strict=True):
        assert piece.name == "x" and piece.datatype == datatype
        assert bytes(piece.data) == bytes(part.data)
        np.testing.assert_array_equal(piece.array(), part.array())


def test_split_rows_of_numeric_tensor_is_zero_copy() -> None:
    joined = Tensor.from_array("x", np.arange(8, dtype=np.float32).reshape(4, 2))
    first, second = split_rows(joined, [3, 1])
    assert isinstance(first.data, memoryview) and isinstance(second.data, memoryview)
    np.testing.assert_array_equal(second.array(), [[6.0, 7.0]])


def test_split_rows_inverts_concat_rows_for_bytes() -> None:
    parts = [
        Tensor.from_array("s", np.array([b"a", b"bb"], dtype=object)),
        Tensor.from_array("s", np.array([b"ccc"], dtype=object)),
    ]
    joined = concat_rows(parts)
    assert joined.shape == (3,)
    joined.check_size()
    pieces = split_rows(joined, [2, 1])
    assert [list(p.array()) for p in pieces] == [[b"a", b"bb"], [b"ccc"]]
    assert [p.shape for p in pieces] == [(2,), (1,)]


def test_single_part_concat_and_split_return_the_tensor_unchanged() -> None:
    tensor = Tensor.from_array("x", np.ones((2, 2), dtype=np.int16))
    assert concat_rows([tensor]) is tensor
    assert split_rows(tensor, [2]) == [tensor]


@pytest.mark.parametrize(
    ("datatype", "data", "offence"),
    [
        ("FP32", [1, 2, 3, "1.5"], 'data[3] is "1.5", FP32 takes numbers'),
        ("FP32", [None], "data[0] is null, FP32 takes numbers"),
        ("FP32", [[1.0, 2.0], [3.0, True]], "data[3] is true, FP32 takes numbers"),
        ("FP32", [1e39], r"data[0] is 1e+39, FP32 takes numbers within"),
        ("FP16", [70000.0], "data[0] is 70000.0, FP16 takes numbers within"),
        ("INT64", [0.5], "data[0] is 0.5, INT64 takes integers"),
        ("INT64", [1, 2**63], "data[1] is 9223372036854775808, INT64 takes integers"),
        ("INT8", [127, 128], "data[1] is 128, INT8 takes integers from -128 to 127"),
        ("UINT8", [-1], "data[0] is -1, UINT8 takes integers from 0 to 255"),
        ("UINT32", [[1], ["2"]], 'data[1] is "2", UINT32 takes integers'),
        ("BOOL", [True, 1], "data[1] is 1, BOOL takes true or false"),
        ("BOOL", ["true"], 'data[0] is "true", BOOL takes true or false'),
    ],
)
def test_json_data_is_strict_and_names_the_input_and_first_offending_element(
    datatype: str, data: list[object], offence: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        array_from_json("features", datatype, data)
    assert str(raised.value).startswith(f"input 'features': {offence}")


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP32", [[1, 2.5], [-3e38, 0]], [1.0, 2.5, -3e38, 0.0]),
        ("FP64", [1e300, -2], [1e300, -2.0]),
        ("INT64", [-(2**63), 2**63 - 1], [-(2**63), 2**63 - 1]),
        ("INT32", [1.0, 2], [1, 2]),
        ("UINT64", [2**64 - 1], [2**64 - 1]),
        ("BOOL", [[True], [False]], [True, False]),
        ("FP32", [], []),
    ],
)
def test_valid_json_data_becomes_a_flat_array_of_the_datatype(
    datatype: str, data: list[object], expected: list[object]
) -> None:
    array = array_from_json("features", datatype, data)
    assert array.dtype == DTYPES[datatype]
    np.testing.assert_array_equal(array, np.asarray(expected, dtype=DTYPES[datatype]))


def test_ragged_json_data_is_invalid_input_naming_the_input() -> None:
    with pytest.raises(InvalidInput, match="input 'features': data is not valid FP32"):
        array_from_json("features", "FP32", [[1.0, 2.0], [3.0]])
