"""Validating requests against a signature: every failure names the field at fault."""

from __future__ import annotations

import numpy as np
import pytest

from services.gateway.validation import validate_request
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import Tensor, serialize_bytes
from services.mesh.domain.types import InferRequest, Signature, TensorSpec

SIGNATURE = Signature(
    inputs=(TensorSpec("features", "FP32", (-1, 4)), TensorSpec("ids", "INT64", (-1,))),
    outputs=(TensorSpec("probs", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,))),
)


def features(rows: int = 2, width: int = 4) -> Tensor:
    return Tensor.from_array("features", np.zeros((rows, width), dtype=np.float32))


def ids(rows: int = 2) -> Tensor:
    return Tensor.from_array("ids", np.arange(rows, dtype=np.int64))


def validate(*inputs: Tensor, outputs: list[str] | None = None, max_rows: int = 8) -> None:
    request = InferRequest(model="m", inputs=list(inputs), request_id="r", outputs=outputs)
    validate_request(request, SIGNATURE, max_rows=max_rows)


def test_a_matching_request_passes() -> None:
    validate(features(), ids(), outputs=["probs"])


def test_an_unknown_input_is_named() -> None:
    extra = Tensor.from_array("bogus", np.zeros(2, dtype=np.int64))
    with pytest.raises(InvalidInput, match="unexpected input 'bogus'"):
        validate(features(), ids(), extra)


def test_a_missing_input_is_named() -> None:
    with pytest.raises(InvalidInput, match="missing input 'ids'"):
        validate(features())


def test_a_duplicate_input_is_named() -> None:
    with pytest.raises(InvalidInput, match="input 'ids' is given more than once"):
        validate(features(), ids(), ids())


def test_a_wrong_datatype_is_named() -> None:
    wrong = Tensor.from_array("ids", np.arange(2, dtype=np.int32))
    with pytest.raises(InvalidInput, match="input 'ids': datatype INT32 .* INT64"):
        validate(features(), wrong)


def test_a_wrong_rank_is_named() -> None:
    flat = Tensor.from_array("features", np.zeros(8, dtype=np.float32))
    with pytest.raises(InvalidInput, match=r"input 'features': shape \[8\]"):
        validate(flat, ids())


def test_a_wrong_fixed_dimension_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"input 'features': shape \[2, 3\]"):
        validate(features(width=3), ids())


def test_a_zero_row_input_is_named() -> None:
    with pytest.raises(InvalidInput, match="input 'features': 0 rows; a request carries at least"):
        validate(Tensor("features", "FP32", (0, 4), b""), Tensor("ids", "INT64", (0,), b""))


def test_a_zero_element_input_is_named() -> None:
    signature = Signature(
        inputs=(TensorSpec("x", "FP32", (-1, -1)),), outputs=(TensorSpec("y", "FP32", (-1,)),)
    )
    empty = Tensor("x", "FP32", (2, 0), b"")
    request = InferRequest(model="m", inputs=[empty], request_id="r")
    with pytest.raises(InvalidInput, match=r"input 'x': shape \[2, 0\] has no elements"):
        validate_request(request, signature, max_rows=8)


def test_an_element_count_mismatch_is_named() -> None:
    short = Tensor("features", "FP32", (2, 4), b"\0" * 12)
    with pytest.raises(InvalidInput, match="input 'features': 12 bytes"):
        validate(short, ids())


def test_a_bytes_element_count_mismatch_is_named() -> None:
    signature = Signature(
        inputs=(TensorSpec("text", "BYTES", (-1,)),), outputs=(TensorSpec("y", "FP32", (-1,)),)
    )
    text = Tensor("text", "BYTES", (3,), serialize_bytes([b"a", b"b"]))
    request = InferRequest(model="m", inputs=[text], request_id="r")
    with pytest.raises(InvalidInput, match="input 'text': 2 BYTES elements"):
        validate_request(request, signature, max_rows=8)


def test_more_rows_than_max_batch_size_is_named() -> None:
    with pytest.raises(InvalidInput, match="input 'features': batch of 9 rows .* 8"):
        validate(features(rows=9), ids(rows=9), max_rows=8)


def test_inputs_disagreeing_on_rows_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="batch dimension"):
        validate(features(rows=2), ids(rows=3))


def test_an_unknown_requested_output_is_named() -> None:
    with pytest.raises(InvalidInput, match="unknown output 'logits'"):
        validate(features(), ids(), outputs=["probs", "logits"])
