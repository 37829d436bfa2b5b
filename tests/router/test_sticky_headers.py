"""The router hashes the sticky key its own rollout names, from a parameter the client set or
a header the gateway forwarded under its lower-cased name."""

from __future__ import annotations

import numpy as np

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, Rollout, Route
from services.router.core import Router
from services.router.policy import bucket_of
from tests.router.test_fit import Batcher, make_config

ROLLOUT = Rollout("m", (Route("1", 50.0), Route("2", 50.0)), sticky_key="X-User-Id",
                  salt="pepper", fallback="1")


def request(request_id: str, **parameters: object) -> InferRequest:
    tensor = Tensor.from_array("x", np.zeros((1, 2), dtype=np.float32))
    return InferRequest("m", [tensor], request_id=request_id, parameters=dict(parameters))


async def test_a_forwarded_header_is_found_under_its_lower_cased_name() -> None:
    config: StaticConfig = make_config(ROLLOUT, {"1": 2, "2": 2})
    router = Router(ModelCatalog(config), Batcher())
    forwarded = await router.infer(request("r1", **{"x-user-id": "alice"}))
    assert forwarded.parameters["bucket"] == bucket_of("pepper", "alice")
    own = await router.infer(request("r2", **{"X-User-Id": "bob", "x-user-id": "alice"}))
    assert own.parameters["bucket"] == bucket_of("pepper", "bob")
