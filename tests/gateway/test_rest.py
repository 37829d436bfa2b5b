"""OIP v2 JSON to domain types and back: pure functions, errors naming the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from services.gateway.rest import decode_infer, decode_infer_body, encode_infer
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import Tensor, deserialize_bytes
from services.mesh.domain.types import InferRequest, InferResponse


def decode(*inputs: dict[str, Any], **body: Any) -> InferRequest:
    return decode_infer({"inputs": list(inputs), **body}, model="m", version=None,
                        request_id="gateway-id")


def test_flat_data_is_decoded_to_raw_tensor_bytes() -> None:
    request = decode({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]})
    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", "FP32", (2, 2))
    np.testing.assert_array_equal(tensor.array(), [[1, 2], [3, 4]])
    assert tensor.array().dtype == np.float32
    assert request.request_id == "gateway-id"
    assert request.outputs is None


def test_nested_data_is_decoded_the_same_way() -> None:
    request = decode({"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]})
    np.testing.assert_array_equal(request.inputs[0].array(), [[1, 2], [3, 4]])
    assert request.inputs[0].array().dtype == np.int64


def test_the_clients_id_outputs_and_parameters_are_kept() -> None:
    request = decode(
        {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
        id="client-7", outputs=[{"name": "y"}], parameters={"user": "alice"},
    )
    assert request.request_id == "client-7"
    assert request.outputs == ["y"]
    assert request.parameters == {"user": "alice"}


def test_a_bad_datatype_is_named() -> None:
    with pytest.raises(InvalidInput, match="input 'x': unknown datatype 'FLOAT'"):
        decode({"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]})


def test_non_numeric_data_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': data\[0\] is \"a\", FP32 takes numbers"):
        decode({"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]})


def test_an_element_count_mismatch_is_named() -> None:
    with pytest.raises(InvalidInput, match="input 'x': 3 elements in data, shape needs 4"):
        decode({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]})


def test_missing_data_is_named() -> None:
    with pytest.raises(InvalidInput, match="input 'x': 'data' is missing"):
        decode({"name": "x", "datatype": "FP32", "shape": [1]})


def test_a_negative_shape_is_named() -> None:
    with pytest.raises(InvalidInput, match="input 'x': 'shape'"):
        decode({"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]})


def test_empty_inputs_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="'inputs'"):
        decode_infer({"inputs": []}, model="m", version=None, request_id="r")


def test_bytes_inputs_are_serialized_per_element() -> None:
    request = decode({"name": "t", "datatype": "BYTES", "shape": [2], "data": ["héllo", "w"]})
    [tensor] = request.inputs
    assert deserialize_bytes(tensor.data) == ["héllo".encode(), b"w"]
    tensor.check_size()


def test_a_bytes_count_mismatch_is_named() -> None:
    with pytest.raises(InvalidInput, match="input 't': 1 elements in data, shape needs 2"):
        decode({"name": "t", "datatype": "BYTES", "shape": [2], "data": ["only"]})


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]"])
def test_a_body_that_is_not_a_json_object_is_refused_naming_the_body(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="^body: "):
        decode_infer_body(body, header_length=None, model="m", version=None, request_id="r")


def test_encode_infer_writes_the_oip_response() -> None:
    response = InferResponse(
        model="m", version="2", request_id="req-9", parameters={"bucket": 17},
        outputs=[
            Tensor.from_array("probs", np.array([[0.25, 0.75]], dtype=np.float32)),
            Tensor.from_array("label", np.array([b"cat"], dtype=object)),
        ],
    )
    assert orjson.loads(encode_infer(response)) == {
        "model_name": "m",
        "model_version": "2",
        "id": "req-9",
        "parameters": {"bucket": 17},
        "outputs": [
            {"name": "probs", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
            {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["cat"]},
        ],
    }
