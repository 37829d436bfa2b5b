"""The router drops a request whose deadline passed instead of forwarding it."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import DeadlineExceeded
from services.mesh.domain.types import InferRequest, InferResponse
from services.router.core import Router
from tests.router.test_core import FakeBatcher, make_config, request

MISSED = "infermesh_deadline_exceeded_total"


@pytest.mark.parametrize("version", [None, "2"])  # routed by the rollout, and pinned
async def test_an_expired_request_is_not_forwarded(version: str | None) -> None:
    batcher = FakeBatcher()
    router = Router(ModelCatalog(make_config()), batcher)
    expired = request(version=version)
    expired.deadline = time.time() - 0.001
    with pytest.raises(DeadlineExceeded):
        await router.infer(expired)
    assert batcher.seen == []
    assert router.metrics.registry.get_sample_value(MISSED, {"hop": "router"}) == 1
    live = request(version=version)
    live.deadline = time.time() + 30
    await router.infer(live)
    assert len(batcher.seen) == 1


class _HangingBatcher:
    async def infer(self, request: InferRequest) -> InferResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_caller_that_leaves_is_not_counted_as_the_versions_failure() -> None:
    # The rollout guard reads the failure count: a client that disconnected (its handler
    # cancelled) says nothing about the version.
    router = Router(ModelCatalog(make_config()), _HangingBatcher())
    call = asyncio.create_task(router.infer(request(version="2")))
    await asyncio.sleep(0)  # let it reach the batcher
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    failures = router.metrics.registry.get_sample_value(
        "infermesh_router_requests_total", {"model": "m", "version": "2", "outcome": "failure"}
    )
    assert not failures
