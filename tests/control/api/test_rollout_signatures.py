"""The control API refuses a rollout whose versions disagree with its primary's signature: the
gateway validates against the primary, so any other version must accept what it accepts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control.api.app import create_app
from services.mesh.domain.errors import InvalidInput
from tests.control.api.conftest import ControlHarness, canary
from tests.registry.harness import SIGNATURE, chunks_of

Client = TestClient[web.Request, web.Application]
ADMIN = {"Authorization": "Bearer admin-secret"}
NARROW: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
    "outputs": SIGNATURE["outputs"],
}
MESSAGE = ("rollout for iris: version 9 input 'x' has shape [-1,8], "
           "primary version 1 has [-1,4]")


@pytest.fixture
async def narrow(control: ControlHarness) -> ControlHarness:
    """iris version 9 takes `x` [-1, 8] where versions 1 to 3 take [-1, 4]; version 4 has
    the same signature as 1 and its own batching."""
    registry = control.registry.registry
    info = await registry.put_artifact(chunks_of(b"other torchscript bytes"))
    await registry.register_version("iris", "9", artifact_sha256=info.sha256, signature=NARROW)
    await registry.register_version("iris", "4", artifact_sha256=info.sha256,
                                    signature=SIGNATURE, batching={"max_batch_size": 3})
    return control


@pytest.fixture
async def client(narrow: ControlHarness) -> AsyncIterator[Client]:
    app = create_app(narrow.store, {"admin-secret": "admin"}, tenants=narrow.tenants)
    async with TestClient(TestServer(app)) as client:
        yield client


def routes(*weights: tuple[str, float]) -> list[dict[str, Any]]:
    return [{"version": version, "weight": weight} for version, weight in weights]


async def test_a_canary_with_another_input_shape_is_400_naming_it(
    client: Client, narrow: ControlHarness
) -> None:
    body = {"routes": routes(("1", 90), ("9", 10))}
    response = await client.put("/v1/rollouts/iris", json=body, headers=ADMIN)
    assert response.status == 400
    assert await response.json() == {"error": MESSAGE}
    assert await narrow.saved_epoch() == 1
    assert (await narrow.published())["routes"] == routes(("1", 100.0))


@pytest.mark.parametrize("body", [
    {"routes": routes(("1", 100)), "shadow": [{"version": "9", "fraction": 0.5}]},
    {"routes": routes(("1", 100)), "fallback": "9"},
])
async def test_an_incompatible_shadow_or_fallback_is_refused(
    narrow: ControlHarness, body: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput) as refused:
        await narrow.store.apply("iris", body, author="alice", if_match=None)
    assert refused.value.message == MESSAGE
    assert await narrow.saved_epoch() == 1


async def test_the_primary_is_the_heaviest_route(narrow: ControlHarness) -> None:
    body = {"routes": routes(("1", 10), ("9", 90)), "fallback": "9"}
    with pytest.raises(InvalidInput) as refused:
        await narrow.store.apply("iris", body, author="alice", if_match=None)
    assert refused.value.message == (
        "rollout for iris: version 1 input 'x' has shape [-1,4], primary version 9 has [-1,8]"
    )


async def test_a_compatible_canary_with_its_own_batching_and_a_full_switch_are_accepted(
    client: Client, narrow: ControlHarness
) -> None:
    response = await client.put("/v1/rollouts/iris", json=canary(50, shadow=[
        {"version": "4", "fraction": 1.0}]), headers=ADMIN)
    assert response.status == 200, await response.json()
    switched = await narrow.store.apply(
        "iris", {"routes": routes(("9", 100)), "fallback": "9"}, author="alice", if_match=None
    )
    assert switched.primary == "9"
    assert (await narrow.published())["routes"] == routes(("9", 100.0))
