"""Comparing a shadow's outputs with the primary's: a pure function over tensors."""

from __future__ import annotations

import numpy as np
import pytest

from services.mesh.domain.tensors import Tensor
from services.router.shadow import Agreement, compare_outputs


def fp32(name: str, values: list[object]) -> Tensor:
    return Tensor.from_array(name, np.array(values, dtype=np.float32))


def test_rows_are_every_dim_but_the_last() -> None:
    primary = Tensor.from_array("y", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    shadow = Tensor.from_array("y", np.arange(24, dtype=np.float32).reshape(2, 3, 4)[..., ::-1])
    found = compare_outputs([primary], [shadow])
    assert found is not None and (found.rows, found.argmax_agreements) == (6, 0)
    assert found.mean_abs_diff == pytest.approx(2.0)  # |i - (3 - i)| over i in 0..3


def test_a_one_dimensional_output_is_one_row() -> None:
    found = compare_outputs([fp32("y", [0.1, 0.5, 0.4])], [fp32("y", [0.2, 0.6, 0.2])])
    assert found is not None and (found.rows, found.argmax_agreements) == (1, 1)
    assert found.mean_abs_diff == pytest.approx(0.4 / 3)


def test_the_first_output_present_in_both_is_compared() -> None:
    primary = [fp32("a", [[1, 0]]), fp32("b", [[0, 1]])]
    shadow = [fp32("b", [[1, 0]]), fp32("c", [[0, 1]])]
    found = compare_outputs(primary, shadow)
    assert found is not None and found.argmax_agreements == 0


def test_numeric_datatypes_may_differ() -> None:
    shadow = Tensor.from_array("y", np.array([[1, 3]], dtype=np.float16))
    assert compare_outputs([fp32("y", [[1, 2]])], [shadow]) == Agreement(1, 1, 0.5)


@pytest.mark.parametrize("shadow", [
    fp32("y", [[1, 2, 3]]),  # another shape
    fp32("z", [[1, 2]]),  # no common name
    Tensor.from_array("y", np.array([b"a", b"b"], dtype=object)),  # BYTES
    Tensor("y", "FP32", (1, 2), b"\0" * 4),  # data shorter than its shape
])
def test_nothing_comparable_is_skipped(shadow: Tensor) -> None:
    assert compare_outputs([fp32("y", [[1, 2]])], [shadow]) is None


def test_bytes_outputs_are_skipped() -> None:
    text = Tensor.from_array("t", np.array([b"a"], dtype=object))
    assert compare_outputs([text], [text]) is None
