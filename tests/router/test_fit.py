"""The router re-checks a routed request against the version it chose: a request the gateway
validated against another version's signature gets a 400 naming the field, never a worker."""

from __future__ import annotations

import numpy as np
import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InvalidInput, Unavailable
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
from services.router.policy import choose_version


def signature(width: int) -> Signature:
    return Signature((TensorSpec("x", "FP32", (-1, width)),), (TensorSpec("y", "FP32", (-1, 2)),))


SPLIT = Rollout("m", (Route("1", 50.0), Route("2", 50.0)), sticky_key="user", fallback="1")
USERS = [f"user-{i}" for i in range(40)]


class Batcher:
    """Answers every request with the version it was given; fails versions in `down`."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.down: set[str] = set()

    async def infer(self, request: InferRequest) -> InferResponse:
        assert request.version is not None
        self.seen.append(request.version)
        if request.version in self.down:
            raise Unavailable(f"no worker for m/{request.version}")
        return InferResponse(request.model, request.version, request.request_id, [])


def make_config(rollout: Rollout, widths: dict[str, int]) -> StaticConfig:
    config = StaticConfig({"rollouts/m": rollout.to_json()})
    for version, width in widths.items():
        spec = ModelVersion("m", version, signature(width), "file:///dev/null", "0" * 64)
        config.put(f"models/m/{version}", spec.to_json())
        config.put(f"endpoints/worker/w{version}", {"models": [f"m/{version}"]})
    return config


def request(user: str, *, width: int = 2, outputs: list[str] | None = None) -> InferRequest:
    tensor = Tensor.from_array("x", np.zeros((1, width), dtype=np.float32))
    return InferRequest("m", [tensor], request_id=user, parameters={"user": user},
                        outputs=outputs)


def users_of(version: str) -> list[str]:
    return [u for u in USERS if choose_version(SPLIT, u, is_ready=bool).version == version]


async def test_a_request_that_does_not_fit_the_chosen_version_is_400_before_the_batcher() -> None:
    batcher = Batcher()
    router = Router(ModelCatalog(make_config(SPLIT, {"1": 2, "2": 3})), batcher)
    for user in users_of("1"):
        assert (await router.infer(request(user))).version == "1"
    for user in users_of("2"):
        with pytest.raises(InvalidInput) as refused:
            await router.infer(request(user))
        assert refused.value.message == (
            "input 'x': shape [1,2], version 2 of m takes [-1,3]"
        )
    assert set(batcher.seen) == {"1"}


async def test_a_requested_output_the_chosen_version_lacks_is_400() -> None:
    router = Router(ModelCatalog(make_config(SPLIT, {"1": 2, "2": 2})), Batcher())
    with pytest.raises(InvalidInput, match="output 'z' is not an output of version"):
        await router.infer(request(users_of("2")[0], outputs=["z"]))


async def test_compatible_versions_are_served_and_pinned_requests_are_not_rechecked() -> None:
    batcher = Batcher()
    config = make_config(SPLIT, {"1": 2, "2": 2, "3": 5})
    router = Router(ModelCatalog(config), batcher)
    served = {(await router.infer(request(user))).version for user in USERS}
    assert served == {"1", "2"}
    pinned = request("p", width=5)
    pinned.version = "3"  # the gateway validated it against version 3 itself
    assert (await router.infer(pinned)).version == "3"


async def test_an_unavailable_canary_does_not_fall_back_to_a_version_that_cannot_run_it() -> None:
    batcher = Batcher()
    batcher.down.add("2")
    split = Rollout("m", (Route("1", 50.0), Route("2", 50.0)), sticky_key="user", fallback="3")
    config = make_config(split, {"1": 2, "2": 2, "3": 7})
    router = Router(ModelCatalog(config), batcher)
    user = next(u for u in USERS if choose_version(split, u, is_ready=bool).version == "2")
    with pytest.raises(Unavailable):
        await router.infer(request(user))
    assert batcher.seen == ["2"]
