"""Packing a job's rows (services.gateway.jobs_packing) alone: which rows share a request, and
that each row gets back exactly its own outputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from services.gateway.jobs_packing import join, packable, packs, unpack
from services.mesh.domain.caching import CachePolicy
from services.mesh.domain.features import feature_spec_of
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    ModelVersion,
    Signature,
    TensorSpec,
)
from tests.gateway.echo import SIGNATURES


def request(i: int, *, rows: int = 1, width: int = 2, **parameters: Any) -> InferRequest:
    data = np.arange(rows * width, dtype=np.float32).reshape(rows, width) + 100 * i
    return InferRequest("echo", [Tensor.from_array("features", data)], f"r{i}",
                        parameters=dict(parameters))


def test_rows_alike_share_one_request_up_to_the_most_rows() -> None:
    rows = [request(i) for i in range(5)]
    assert [[r.request_id for r in g] for g in packs(rows, 2)] == [
        ["r0", "r1"], ["r2", "r3"], ["r4"]]


def test_rows_that_differ_in_shape_outputs_or_parameters_travel_apart() -> None:
    rows = [request(0), request(1, width=3), request(2, sticky="a"), request(3),
            request(4, sticky="a"), request(5, rows=3)]
    rows.append(InferRequest("echo", rows[0].inputs, "r6", outputs=["features_echo"]))
    groups = [[r.request_id for r in g] for g in packs(rows, 4)]
    assert groups == [["r0", "r3"], ["r1"], ["r2", "r4"], ["r5"], ["r6"]]


def test_a_scalar_or_a_request_as_large_as_a_pack_travels_alone() -> None:
    one = np.array(1.0, dtype=np.float32)
    scalar = InferRequest("echo", [Tensor.from_array("features", one)], "s")
    big = request(1, rows=4)
    assert [[r.request_id for r in g] for g in packs([scalar, big, request(2)], 4)] == [
        ["s"], ["r1"], ["r2"]]


def test_each_row_gets_back_its_own_outputs_under_its_own_id() -> None:
    group = [request(0), request(1, rows=2), request(2)]
    joined = join(group, "pack")
    assert joined.request_id == "pack" and joined.rows == 4
    echoed = [Tensor("features_echo", t.datatype, t.shape, t.data) for t in joined.inputs]
    answers = unpack(InferResponse("echo", "1", "pack", echoed, {"trace_id": "t"}), group)
    assert [a.request_id for a in answers] == ["r0", "r1", "r2"]
    for member, answer in zip(group, answers, strict=True):
        assert np.array_equal(answer.outputs[0].array(), member.inputs[0].array())
        assert answer.parameters == {"trace_id": "t"}


def test_versions_with_features_or_a_cache_are_never_packed() -> None:
    plain = ModelVersion("echo", "1", SIGNATURES["echo"], "file:///dev/null", "0" * 64)
    assert packable(plain)
    assert not packable(dataclasses.replace(plain, cache=CachePolicy.from_json({"ttl_s": 10})))
    raw = {"entity_type": "user", "entity_key": "user_id", "names": ["a", "b"], "max_age_s": 60}
    feature = feature_spec_of(raw, "FP32", (-1, 2), where="features")
    signature = Signature((TensorSpec("features", "FP32", (-1, 2), feature=feature),),
                          plain.signature.outputs)
    assert not packable(dataclasses.replace(plain, signature=signature))
