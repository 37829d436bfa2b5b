"""Shadow mirroring through the router core, with an in-process fake batcher as its next hop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import numpy as np
import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InternalError, Unavailable
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Route
from services.router.core import Router
from services.router.metrics import RouterMetrics
from tests.router.fakes import (
    PRIMARY_ROWS,
    SHADOW_ROWS,
    FakeBatcher,
    make_config,
    request,
    rollout,
)


@pytest.fixture
def batcher() -> FakeBatcher:
    return FakeBatcher()


@pytest.fixture
def config() -> StaticConfig:
    return make_config(rollout())


@pytest.fixture
def metrics() -> RouterMetrics:
    return RouterMetrics()


@pytest.fixture
async def router(
    config: StaticConfig, batcher: FakeBatcher, metrics: RouterMetrics
) -> AsyncIterator[Router]:
    router = Router(ModelCatalog(config), batcher, metrics=metrics, shadow_max_inflight=4)
    yield router
    await router.aclose()


def shadow_count(metrics: RouterMetrics, outcome: str, version: str = "3") -> float:
    value = metrics.registry.get_sample_value(
        "infermesh_shadow_requests_total", {"model": "m", "version": version, "outcome": outcome}
    )
    return value or 0.0


def comparison(metrics: RouterMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(
        name, {"model": "m", "primary": "1", "shadow": "3"}
    )


async def test_a_quarter_of_request_ids_is_mirrored(config: StaticConfig,
                                                    batcher: FakeBatcher) -> None:
    config.put("rollouts/m", rollout(0.25).to_json())
    router = Router(ModelCatalog(config), batcher, shadow_max_inflight=4000)
    for i in range(4000):
        await router.infer(request(f"req-{i}"))
    await router.drain()
    mirrored = batcher.lane("shadow")
    assert len(mirrored) / 4000 == pytest.approx(0.25, abs=0.03)
    assert len({r.request_id for r in mirrored}) == len(mirrored)
    await router.aclose()


async def test_the_same_request_id_is_always_mirrored_the_same_way(
    config: StaticConfig, batcher: FakeBatcher, router: Router
) -> None:
    config.put("rollouts/m", rollout(0.5).to_json())
    rounds = []
    for _ in range(2):
        batcher.seen.clear()
        for i in range(40):
            await router.infer(request(f"req-{i}"))
        await router.drain()
        rounds.append([r.request_id for r in batcher.lane("shadow")])
    assert rounds[0] == rounds[1]
    assert 0 < len(rounds[0]) < 40


async def test_the_mirror_is_a_shadow_lane_copy(batcher: FakeBatcher, router: Router) -> None:
    original = request("req-7", user="alice", timeout=5)
    await router.infer(original)
    await router.drain()
    [mirror] = batcher.lane("shadow")
    assert (mirror.request_id, mirror.version, mirror.model) == ("req-7.shadow", "3", "m")
    assert mirror.parameters == {"user": "alice", "timeout": 5, "shadow": True}
    assert mirror.deadline == original.deadline
    assert mirror.inputs[0] is original.inputs[0]
    assert "shadow" not in original.parameters


async def test_pinned_requests_are_never_mirrored(batcher: FakeBatcher, router: Router) -> None:
    for i in range(50):
        await router.infer(request(f"req-{i}", version="1"))
    await router.drain()
    assert batcher.lane("shadow") == []
    assert len(batcher.seen) == 50


async def test_no_mirror_goes_to_the_version_that_served(
    config: StaticConfig, batcher: FakeBatcher, router: Router
) -> None:
    routes = (Route("1", 50.0), Route("2", 50.0))
    config.put("rollouts/m", rollout(1.0, routes=routes, shadow_version="2").to_json())
    served = [(await router.infer(request(f"req-{i}", user=f"u{i}"))).version for i in range(4)]
    await router.drain()
    assert set(served) == {"1", "2"}  # the users above land on both versions
    mirrored = {r.request_id.removesuffix(".shadow") for r in batcher.lane("shadow")}
    assert mirrored == {f"req-{i}" for i, v in enumerate(served) if v == "1"}


async def test_the_response_is_the_same_with_a_shadow_and_does_not_wait_for_it(
    config: StaticConfig, batcher: FakeBatcher, metrics: RouterMetrics
) -> None:
    plain = await Router(ModelCatalog(make_config(rollout(0.0))), FakeBatcher()).infer(request())
    batcher.held["shadow"] = asyncio.Event()
    router = Router(ModelCatalog(config), batcher, metrics=metrics)
    response = await router.infer(request())
    assert (response.model, response.version, response.request_id, response.parameters) == (
        plain.model, plain.version, plain.request_id, plain.parameters)
    assert [t.data for t in response.outputs] == [t.data for t in plain.outputs]
    assert router.shadows_inflight == 1 and shadow_count(metrics, "success") == 0
    batcher.held["shadow"].set()
    await router.drain()
    assert shadow_count(metrics, "success") == 1
    await router.aclose()


async def test_a_failing_shadow_is_counted_not_raised_nor_logged(
    batcher: FakeBatcher, router: Router, metrics: RouterMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    batcher.errors["3"] = InternalError("the shadow model crashed")
    with caplog.at_level(logging.INFO):
        response = await router.infer(request())
        await router.drain()
    assert response.version == "1"
    assert shadow_count(metrics, "failure") == 1
    assert shadow_count(metrics, "success") == 0
    assert comparison(metrics, "infermesh_shadow_comparisons_total") is None
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


async def test_mirrors_past_the_bound_are_dropped(
    batcher: FakeBatcher, router: Router, metrics: RouterMetrics
) -> None:
    batcher.held["shadow"] = asyncio.Event()
    for i in range(7):
        assert (await router.infer(request(f"req-{i}"))).version == "1"
    assert router.shadows_inflight == 4
    assert shadow_count(metrics, "dropped") == 3
    batcher.held["shadow"].set()
    await router.drain()
    assert shadow_count(metrics, "success") == 4
    assert len(batcher.lane("shadow")) == 4


async def test_a_shadow_version_without_a_ready_worker_is_dropped(
    config: StaticConfig, batcher: FakeBatcher, router: Router, metrics: RouterMetrics
) -> None:
    config.delete("endpoints/worker/w3")
    await router.infer(request())
    await router.drain()
    assert batcher.lane("shadow") == []
    assert shadow_count(metrics, "dropped") == 1


async def test_identical_outputs_agree_on_every_row(
    router: Router, metrics: RouterMetrics
) -> None:
    await router.infer(request())
    await router.drain()
    assert comparison(metrics, "infermesh_shadow_comparisons_total") == 3
    assert comparison(metrics, "infermesh_shadow_argmax_agreements_total") == 3
    assert comparison(metrics, "infermesh_shadow_mean_abs_diff_count") == 1
    assert comparison(metrics, "infermesh_shadow_mean_abs_diff_sum") == 0


async def test_different_outputs_count_agreements_and_the_mean_difference(
    batcher: FakeBatcher, router: Router, metrics: RouterMetrics
) -> None:
    batcher.outputs["3"] = [Tensor.from_array("x", SHADOW_ROWS)]
    await router.infer(request())
    await router.drain()
    assert comparison(metrics, "infermesh_shadow_comparisons_total") == 3
    assert comparison(metrics, "infermesh_shadow_argmax_agreements_total") == 1
    expected = float(np.abs(PRIMARY_ROWS - SHADOW_ROWS).mean())  # 2.2 / 6
    assert comparison(metrics, "infermesh_shadow_mean_abs_diff_sum") == pytest.approx(expected)
    assert comparison(metrics, "infermesh_shadow_mean_abs_diff_count") == 1


async def test_aclose_cancels_mirrors_in_flight(
    config: StaticConfig, batcher: FakeBatcher, metrics: RouterMetrics
) -> None:
    router = Router(ModelCatalog(config), batcher, metrics=metrics)
    batcher.held["shadow"] = asyncio.Event()  # never set
    await router.infer(request())
    await batcher.holding.wait()
    assert router.shadows_inflight == 1
    async with asyncio.timeout(10):  # a mirror left running would hang aclose
        await router.aclose()
    assert batcher.cancelled == ["req-1.shadow"]
    assert router.shadows_inflight == 0
    assert shadow_count(metrics, "success") == shadow_count(metrics, "failure") == 0
    with pytest.raises(Unavailable, match="closed"):
        await router.infer(request())
