"""The router core with an in-process fake batcher as its next hop."""

from __future__ import annotations

import numpy as np
import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import NotFound, Unavailable
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    ModelVersion,
    Rollout,
    Route,
    Signature,
    TensorSpec,
)
from services.router.core import Router
from services.router.policy import bucket_of, choose_version

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)
ROLLOUT = Rollout(
    "m", (Route("1", 50.0), Route("2", 50.0)), sticky_key="user", salt="pepper", fallback="1",
    epoch=7,
)


class FakeBatcher:
    """Records what it is asked and answers with the version it was given."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        assert request.version is not None
        return InferResponse(request.model, request.version, request.request_id, request.inputs)


def make_config() -> StaticConfig:
    config = StaticConfig({"rollouts/m": ROLLOUT.to_json()})
    for version in ("1", "2"):
        spec = ModelVersion("m", version, SIGNATURE, "file:///dev/null", "0" * 64)
        config.put(f"models/m/{version}", spec.to_json())
        config.put(f"endpoints/worker/w{version}", {"models": [f"m/{version}"]})
    return config


@pytest.fixture
def batcher() -> FakeBatcher:
    return FakeBatcher()


@pytest.fixture
def config() -> StaticConfig:
    return make_config()


@pytest.fixture
def router(config: StaticConfig, batcher: FakeBatcher) -> Router:
    return Router(ModelCatalog(config), batcher)


def request(*, version: str | None = None, **parameters: object) -> InferRequest:
    tensor = Tensor.from_array("x", np.zeros((1, 2), dtype=np.float32))
    return InferRequest(
        model="m", inputs=[tensor], request_id="req-1", version=version,
        parameters=dict(parameters),
    )


async def test_a_pinned_version_passes_through(router: Router, batcher: FakeBatcher) -> None:
    response = await router.infer(request(version="2"))
    assert response.version == "2"
    assert [r.version for r in batcher.seen] == ["2"]
    assert "bucket" not in response.parameters


async def test_an_unknown_pinned_version_is_not_found(
    router: Router, batcher: FakeBatcher
) -> None:
    with pytest.raises(NotFound, match="'9'"):
        await router.infer(request(version="9"))
    assert batcher.seen == []


async def test_an_unknown_model_is_not_found(router: Router) -> None:
    req = request()
    req.model = "nope"
    with pytest.raises(NotFound, match="'nope'"):
        await router.infer(req)


async def test_an_unpinned_request_gets_the_rollouts_choice(
    router: Router, batcher: FakeBatcher
) -> None:
    for user in (f"user-{i}" for i in range(40)):
        expected = choose_version(ROLLOUT, user, is_ready=lambda v: True)
        response = await router.infer(request(user=user))
        assert response.version == expected.version
        assert response.parameters["bucket"] == bucket_of("pepper", user)
        assert response.parameters["rollout_epoch"] == 7
    assert {r.version for r in batcher.seen} == {"1", "2"}


async def test_the_sticky_key_comes_from_request_parameters(router: Router) -> None:
    first = await router.infer(request(user="alice"))
    again = await router.infer(request(user="alice"))
    assert first.version == again.version
    assert first.parameters["bucket"] == bucket_of("pepper", "alice")


async def test_without_the_sticky_parameter_the_request_id_is_hashed(router: Router) -> None:
    response = await router.infer(request())
    assert response.parameters["bucket"] == bucket_of("pepper", "req-1")


async def test_traffic_falls_back_when_the_canary_has_no_ready_worker(
    config: StaticConfig, router: Router
) -> None:
    config.delete("endpoints/worker/w2")
    versions = set()
    for user in (f"user-{i}" for i in range(40)):
        response = await router.infer(request(user=user))
        versions.add(response.version)
        routed = choose_version(ROLLOUT, user, is_ready=lambda v: True).version
        assert response.parameters.get("fallback", False) == (routed == "2")
    assert versions == {"1"}


class VanishingWorkerBatcher(FakeBatcher):
    """Version 2's worker is gone, though the catalog still lists it (its lease lives on)."""

    async def infer(self, request: InferRequest) -> InferResponse:
        if request.version == "2":
            self.seen.append(request)
            raise Unavailable("no worker for m/2 after 5.0s")
        return await super().infer(request)


async def test_a_routed_version_that_turns_out_unavailable_is_retried_on_the_fallback(
    config: StaticConfig,
) -> None:
    batcher = VanishingWorkerBatcher()
    router = Router(ModelCatalog(config), batcher)
    users = [f"user-{i}" for i in range(40)]
    canary_users = [u for u in users if choose_version(ROLLOUT, u, is_ready=bool).version == "2"]
    assert canary_users
    for user in canary_users:
        response = await router.infer(request(user=user))
        assert (response.version, response.parameters["fallback"]) == ("1", True)
    pinned = request(version="2")
    with pytest.raises(Unavailable):  # a pinned request has no fallback
        await router.infer(pinned)
    config.delete("endpoints/worker/w1")
    with pytest.raises(Unavailable):  # nor does one whose fallback has no worker either
        await router.infer(request(user=canary_users[0]))
