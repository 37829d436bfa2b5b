"""Properties of the gateway's OIP JSON decoder (`rest.decode_infer_body`, then
`validate_request` as the gateway runs them): any body, bytes or JSON of any shape, is a
request or InvalidInput, never another exception; a valid request for a signature decodes to
the tensors it encodes."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.gateway import rest
from services.gateway.validation import validate_request
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import DATATYPES, DTYPES
from services.mesh.domain.types import (
    BatchingPolicy,
    InferRequest,
    ModelVersion,
    Signature,
    TensorSpec,
)
from tests.property.strategies import float_width, json_objects, json_values, names, text

MAX_ROWS = 4


@st.composite
def model_versions(draw: st.DrawFn) -> ModelVersion:
    """A version whose signature declares 1 to 3 inputs of any datatypes, each with a batch
    dimension (-1: the inputs must agree on it) and up to two more, fixed or dynamic."""
    input_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    specs = tuple(
        TensorSpec(name, draw(st.sampled_from(DATATYPES)),
                   (-1, *draw(st.lists(st.sampled_from([-1, 1, 2, 3]), max_size=2))))
        for name in input_names
    )
    signature = Signature(specs, (TensorSpec("out", "FP32", (-1,)),))
    return ModelVersion(model="m", version="1", signature=signature, artifact_uri="file:///m",
                        sha256="0" * 64, batching=BatchingPolicy(max_batch_size=MAX_ROWS))


def _shape(spec: TensorSpec, rows: int, data: st.DataObject) -> tuple[int, ...]:
    return (rows, *(dim if dim != -1 else data.draw(st.integers(1, 3)) for dim in spec.shape[1:]))


def _values(datatype: str, shape: tuple[int, ...]) -> st.SearchStrategy[Any]:
    """Valid JSON elements of `datatype`, as the numpy array they stand for."""
    if datatype == "BYTES":
        return st.lists(text, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
    dtype = DTYPES[datatype]
    elements = None
    if dtype.kind == "f":
        elements = st.floats(allow_nan=False, allow_infinity=False, width=float_width(datatype))
    return hnp.arrays(dtype, shape, elements=elements)


@st.composite
def valid_bodies(draw: st.DrawFn, version: ModelVersion) -> tuple[bytes, dict[str, Any]]:
    """A valid request body for `version`, and the flat values of each input by name."""
    data = draw(st.data())
    rows = draw(st.integers(1, MAX_ROWS))
    entries, expected = [], {}
    for spec in version.signature.inputs:
        shape = _shape(spec, rows, data)
        values = draw(_values(spec.datatype, shape))
        flat = values if isinstance(values, list) else values.reshape(-1).tolist()
        nested = flat if not isinstance(values, np.ndarray) else values.tolist()
        as_nested = draw(st.booleans())
        entries.append({"name": spec.name, "datatype": spec.datatype, "shape": list(shape),
                        "data": nested if as_nested else flat})
        expected[spec.name] = flat
    body: dict[str, Any] = {"inputs": draw(st.permutations(entries))}
    if draw(st.booleans()):
        body["id"] = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                                  min_size=1, max_size=20))
    return orjson.dumps(body), expected


def _decode(body: bytes, version: ModelVersion | None) -> InferRequest:
    request, _ = rest.decode_infer_body(body, header_length=None, model="m", version="1",
                                        request_id="gateway-id", spec=version)
    if version is not None:
        validate_request(request, version.signature,
                         max_rows=version.batching.max_batch_size)
    return request


@given(model_versions().flatmap(lambda v: st.tuples(st.just(v), valid_bodies(v))))
def test_a_valid_request_decodes_to_the_tensors_it_encodes(
    case: tuple[ModelVersion, tuple[bytes, dict[str, Any]]]
) -> None:
    version, (body, expected) = case
    request = _decode(body, version)
    assert request.request_id == orjson.loads(body).get("id", "gateway-id")
    got = {t.name: t.array().reshape(-1).tolist() for t in request.inputs}
    assert got == {name: [v.encode() if isinstance(v, str) else v for v in flat]
                   for name, flat in expected.items()}


def _decodes_or_invalid(body: bytes, version: ModelVersion | None) -> None:
    try:
        request = _decode(body, version)
    except InvalidInput:
        return
    for tensor in request.inputs:  # what the gateway hands on can be read
        tensor.check_size()
        tensor.array()


@given(st.binary(max_size=300), st.none() | model_versions())
def test_arbitrary_bytes_are_invalid_input(body: bytes, version: ModelVersion | None) -> None:
    _decodes_or_invalid(body, version)


@given(json_values, st.none() | model_versions())
def test_arbitrary_json_is_invalid_input_or_decodes(
    value: Any, version: ModelVersion | None
) -> None:
    _decodes_or_invalid(orjson.dumps(value), version)


# Bodies shaped like requests, with any field wrong: the decoder's deeper paths.
oip_inputs = st.fixed_dictionaries({}, optional={
    "name": names | json_values,
    "datatype": st.sampled_from(DATATYPES) | json_values,
    "shape": st.lists(st.integers(-1, 3), max_size=3) | json_values,
    "data": json_values,
    "parameters": json_objects,
})
oip_bodies = st.fixed_dictionaries({"inputs": st.lists(oip_inputs | json_values, max_size=3)},
                                   optional={"id": json_values, "parameters": json_values,
                                             "outputs": json_values})


@given(oip_bodies, st.none() | model_versions())
def test_request_shaped_json_with_any_field_wrong_is_invalid_input_or_decodes(
    body: dict[str, Any], version: ModelVersion | None
) -> None:
    _decodes_or_invalid(orjson.dumps(body), version)


@given(model_versions().flatmap(lambda v: st.tuples(st.just(v), valid_bodies(v))), st.data())
def test_a_valid_request_with_one_value_made_wrong_is_invalid_input_or_decodes(
    case: tuple[ModelVersion, tuple[bytes, dict[str, Any]]], data: st.DataObject
) -> None:
    version, (body, _) = case
    request = orjson.loads(body)
    entry = data.draw(st.sampled_from(request["inputs"]), label="input")
    key = data.draw(st.sampled_from(["name", "datatype", "shape", "data"]), label="key")
    entry[key] = data.draw(json_values, label="replacement")
    _decodes_or_invalid(orjson.dumps(request), version)


# Not a hypothesis test: hypothesis raises the recursion limit while a test runs, which would
# hide the RecursionError that data nested 1000 deep once raised (issue 13, row 7).
@pytest.mark.parametrize("datatype", ["BYTES", "FP32"])
@pytest.mark.parametrize("depth", [1, 2, 254, 1000, 1020, 1100])
def test_data_nested_deeper_than_its_shape_is_invalid_input(datatype: str, depth: int) -> None:
    data = b"[" * (depth + 1) + b'"a"' + b"]" * (depth + 1)
    body = b'{"inputs":[{"name":"x","datatype":"%s","shape":[1],"data":%s}]}' % (
        datatype.encode(), data)
    with pytest.raises(InvalidInput):
        _decode(body, None)
