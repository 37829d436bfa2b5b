"""The router's wiring builds the core its settings describe (for the service and fused mode)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client import CollectorRegistry

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import Unavailable
from services.router.settings import RouterSettings
from services.router.wiring import build_router
from tests.router.fakes import FakeBatcher, make_config, request, rollout


def shadows(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value(
        "infermesh_shadow_requests_total", {"model": "m", "version": "3", "outcome": outcome}
    )
    return float(value or 0.0)


async def test_shadow_max_inflight_bounds_the_mirrors_in_flight() -> None:
    batcher = FakeBatcher()
    batcher.held["shadow"] = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        router = await build_router(
            RouterSettings(shadow_max_inflight=1), stack,
            catalog=ModelCatalog(make_config(rollout(1.0))), batcher=batcher,
        )
        for i in range(3):
            await router.core.infer(request(f"r{i}"))
        assert router.core.shadows_inflight == 1
        registry = router.core.metrics.registry
        assert shadows(registry, "dropped") == 2
        batcher.held["shadow"].set()
        await router.core.drain()
        assert shadows(registry, "success") == 1


async def test_without_a_database_url_there_is_no_prediction_log() -> None:
    async with contextlib.AsyncExitStack() as stack:
        router = await build_router(
            RouterSettings(database_url=""), stack,
            catalog=ModelCatalog(make_config(rollout(0.0))), batcher=FakeBatcher(),
        )
        assert (await router.core.infer(request("r1"))).version == "1"
    assert router.core.metrics.registry.get_sample_value(
        "infermesh_prediction_log_written_total") is None
    with pytest.raises(Unavailable, match="closed"):  # the stack closed the core
        await router.core.infer(request("r2"))
