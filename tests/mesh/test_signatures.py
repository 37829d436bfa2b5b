"""Which versions may stand in for a rollout's primary, and which requests fit a version."""

from __future__ import annotations

import numpy as np
import pytest

from services.mesh.domain.signatures import (
    incompatibility,
    request_misfit,
    rollout_incompatibility,
)
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    Rollout,
    Route,
    ShadowRoute,
    Signature,
    TensorSpec,
)


def signature(
    features: tuple[int, ...] = (-1, 32), *, datatype: str = "FP32",
    inputs: tuple[str, ...] = ("features",), outputs: tuple[str, ...] = ("probs",),
    output_shape: tuple[int, ...] = (-1, 2),
) -> Signature:
    return Signature(
        tuple(TensorSpec(name, datatype, features) for name in inputs),
        tuple(TensorSpec(name, "FP32", output_shape) for name in outputs),
    )


V1 = signature()


def test_the_same_signature_and_a_different_batch_dim_are_compatible() -> None:
    assert incompatibility(V1, signature()) is None
    assert incompatibility(signature((-1, 32)), signature((8, 32))) is None


def test_outputs_may_differ_in_shape() -> None:
    assert incompatibility(V1, signature(output_shape=(-1, 3))) is None


@pytest.mark.parametrize(("other", "expected"), [
    (signature((-1, 16)), "input 'features' has shape [-1,16], the primary has [-1,32]"),
    (signature((-1, -1)), "input 'features' has shape [-1,-1], the primary has [-1,32]"),
    (signature((-1, 32, 1)), "input 'features' has shape [-1,32,1], the primary has [-1,32]"),
    (signature(datatype="FP64"), "input 'features' has datatype FP64, the primary has FP32"),
    (signature(inputs=("x",)), "lacks input 'features', which the primary has"),
    (signature(inputs=("features", "mask")), "has input 'mask', which the primary lacks"),
    (signature(outputs=("logits",)), "lacks output 'probs', which the primary has"),
    (signature(outputs=("probs", "logits")), "has output 'logits', which the primary lacks"),
])
def test_a_disagreement_names_the_field_and_both_values(other: Signature, expected: str) -> None:
    assert incompatibility(V1, other) == expected


def test_the_relation_is_symmetric_so_a_ramp_is_never_refused_halfway() -> None:
    wider = signature((-1, -1))
    assert incompatibility(V1, wider) is not None
    assert incompatibility(wider, V1) is not None


def rollout(**fields: object) -> Rollout:
    base: dict[str, object] = {
        "model": "mlp", "routes": (Route("1", 90.0), Route("9", 10.0)), "fallback": "1",
    }
    return Rollout(**{**base, **fields})  # type: ignore[arg-type]


def test_a_rollout_names_the_routed_version_against_its_primary() -> None:
    signatures = {"1": V1, "9": signature((-1, 16))}
    assert rollout_incompatibility(rollout(), signatures) == (
        "rollout for mlp: version 9 input 'features' has shape [-1,16], "
        "primary version 1 has [-1,32]"
    )


def test_the_primary_is_the_heaviest_route_not_the_first() -> None:
    signatures = {"1": V1, "9": signature((-1, 16))}
    found = rollout_incompatibility(
        rollout(routes=(Route("1", 10.0), Route("9", 90.0)), fallback="9"), signatures
    )
    assert found == ("rollout for mlp: version 1 input 'features' has shape [-1,32], "
                     "primary version 9 has [-1,16]")


@pytest.mark.parametrize("fields", [
    {"routes": (Route("1", 100.0),), "shadow": (ShadowRoute("9", 0.5),)},
    {"routes": (Route("1", 100.0),), "fallback": "9"},
])
def test_shadow_and_fallback_versions_are_judged_too(fields: dict[str, object]) -> None:
    found = rollout_incompatibility(rollout(**fields), {"1": V1, "9": signature((-1, 16))})
    assert found is not None and found.startswith("rollout for mlp: version 9 input")


def test_compatible_versions_and_unknown_ones_pass() -> None:
    assert rollout_incompatibility(rollout(), {"1": V1, "9": signature()}) is None
    assert rollout_incompatibility(rollout(), {"1": V1}) is None


def request(
    shape: tuple[int, ...] = (2, 32), *, name: str = "features", dtype: type = np.float32,
    outputs: list[str] | None = None,
) -> InferRequest:
    tensor = Tensor.from_array(name, np.zeros(shape, dtype=dtype))
    return InferRequest("mlp", [tensor], request_id="r", outputs=outputs)


def test_a_request_that_fits_has_no_misfit() -> None:
    assert request_misfit(request(), V1) is None
    assert request_misfit(request(outputs=["probs"]), V1) is None


@pytest.mark.parametrize(("sent", "expected"), [
    (request((2, 16)), "input 'features': shape [2,16], this version takes [-1,32]"),
    (request(dtype=np.float64), "input 'features': datatype FP64, this version takes FP32"),
    (request(name="x"), "input 'x' is not an input of this version"),
    (request(outputs=["logits"]), "output 'logits' is not an output of this version"),
])
def test_a_misfit_names_the_field(sent: InferRequest, expected: str) -> None:
    assert request_misfit(sent, V1) == expected


def test_a_missing_input_is_a_misfit() -> None:
    two = signature(inputs=("features", "mask"))
    assert request_misfit(request(), two) == "input 'mask' is required by this version"
