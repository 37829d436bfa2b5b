"""Overload control at the gateway (issue 14): a request that answers cannot reach before its
deadline is refused at once with 503 + Retry-After, not answered 504 after waiting; nothing is
refused while nothing is in flight; `admission: off` turns it off; the loop lag moves deadlines
back to when the request arrived. The guard's clock is injected; the REST path runs through
aiohttp's test client with a router that takes as long as the test says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.metrics import GatewayMetrics
from services.gateway.overload import OverloadGuard
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import Overloaded
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    Signature,
    TensorSpec,
)
from tests.fakes import model_records
from tests.waiting import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_nothing_in_flight_means_nothing_is_refused() -> None:
    clock = Clock()
    guard = OverloadGuard(clock=clock)
    for _ in range(20):  # slow answers, all back
        ticket = guard.started("m")
        clock.now += 1.0
        guard.finished("m", ticket)
    guard.check("m", deadline=clock.now + 0.001)  # the mesh is idle: no reason to refuse


def test_a_deadline_sooner_than_the_current_sojourn_is_refused_with_retry_after() -> None:
    clock = Clock()
    guard = OverloadGuard(clock=clock)
    busy = guard.started("m")  # keeps the model in flight
    for _ in range(40):  # answers take 200 ms
        ticket = guard.started("m")
        clock.now += 0.2
        guard.finished("m", ticket)
    # The mean converged to 200 ms (within 0.9^40 of it, from 0).
    assert guard.predicted("m") == pytest.approx(0.2, rel=0.02)
    with pytest.raises(Overloaded) as refused:
        guard.check("m", deadline=clock.now + 0.05)
    assert refused.value.retry_after == pytest.approx(0.2, rel=0.02)
    guard.check("m", deadline=clock.now + 0.25)  # a looser SLO still fits
    guard.check("other", deadline=clock.now + 0.05)  # other models are their own flows
    guard.finished("m", busy)


def test_when_answers_stop_coming_the_oldest_request_in_flight_sets_the_wait() -> None:
    clock = Clock()
    guard = OverloadGuard(clock=clock, window=0.25)
    ticket = guard.started("m")
    guard.finished("m", ticket)  # one fast answer: sojourn ~0
    stuck = guard.started("m")
    clock.now += 0.1
    assert guard.predicted("m") == pytest.approx(0.0)  # an answer came within the window
    clock.now += 0.4  # none for 500 ms, one request in flight for 500 ms
    assert guard.predicted("m") == pytest.approx(0.5)
    with pytest.raises(Overloaded):
        guard.check("m", deadline=clock.now + 0.3)
    guard.finished("m", stuck)
    # It came back: with nothing in flight nothing is refused.
    guard.check("m", deadline=clock.now + 0.01)


def test_the_loop_lag_dates_a_request_from_its_arrival() -> None:
    clock = Clock()
    guard = OverloadGuard(clock=clock)
    guard.lag = 0.03
    assert guard.now() == pytest.approx(clock.now - 0.03)
    core = Gateway(ModelCatalog(StaticConfig({})), _SlowRouter(), access=Access(StaticConfig({})),
                   clock=clock, overload=guard)
    assert core.deadline_after(0.1) == pytest.approx(clock.now + 0.07)


async def test_the_probe_measures_a_blocked_loop() -> None:
    guard = OverloadGuard()
    seen: list[float] = []
    guard.on_lag = seen.append
    guard.start_probe(interval=0.002)
    try:
        await wait_for(lambda: len(seen), timeout=5.0, what="a first probe")
        busy_until = time.monotonic() + 0.05
        while time.monotonic() < busy_until:  # holds the loop for 50 ms: that is the lag
            pass
        # The next probe wakes >= 48 ms late (and the estimate decays after it).
        await wait_for(lambda: max(seen) >= 0.04, timeout=5.0, what="a lag of 40 ms or more")
    finally:
        await guard.aclose()


# --- through the REST adapter ---------------------------------------------------------------

SIGNATURE = Signature(
    inputs=(TensorSpec("features", "FP32", (-1, 2)),),
    outputs=(TensorSpec("probs", "FP32", (-1, 2)),),
)


def _body(timeout: float) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                        "data": [1, 2]}], "parameters": {"timeout": timeout}}


class _SlowRouter:
    """Answers after `delay` seconds, or once `gate` opens when one is set; counts the
    requests that reached it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.reached = 0
        self.gate: asyncio.Event | None = None

    async def infer(self, request: InferRequest) -> InferResponse:
        self.reached += 1
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(self.delay)
        outputs = [Tensor("probs", t.datatype, t.shape, t.data) for t in request.inputs]
        return InferResponse(request.model, "1", request.request_id, outputs)


async def _client(
    router: _SlowRouter, registry: CollectorRegistry, *, admission: str = "predictive",
) -> TestClient[Any, Any]:
    records = model_records("m", SIGNATURE)
    records["models/m/1"]["batching"]["admission"] = admission  # type: ignore[index]
    config = StaticConfig(records)
    core = Gateway(ModelCatalog(config), router, access=Access(config, auth=False),
                   metrics=GatewayMetrics(registry))
    client = TestClient(TestServer(create_app(core)))
    await client.start_server()
    return client


@pytest.fixture
async def slow_router() -> AsyncIterator[_SlowRouter]:
    yield _SlowRouter(delay=0.3)


async def test_a_tight_deadline_is_refused_at_once_while_answers_take_longer(
    slow_router: _SlowRouter,
) -> None:
    registry = CollectorRegistry()
    client = await _client(slow_router, registry)
    try:
        # Teach the gateway that answers take 300 ms: 30 requests with room to spare.
        await asyncio.gather(*(client.post("/v2/models/m/infer", json=_body(10.0))
                               for _ in range(30)))
        # While requests are held at the router, one with 50 ms left is refused at once: its
        # 503 arrives while they are still held, so it waited behind none of them.
        slow_router.gate = gate = asyncio.Event()
        loose = [asyncio.ensure_future(client.post("/v2/models/m/infer", json=_body(10.0)))
                 for _ in range(3)]
        await wait_for(lambda: slow_router.reached == 33, timeout=10.0,
                       what="the three loose requests at the router")
        reached = slow_router.reached
        async with asyncio.timeout(30):  # a refusal that waited for the held ones never comes
            response = await client.post("/v2/models/m/infer", json=_body(0.05))
        assert response.status == 503, await response.text()
        assert not any(request.done() for request in loose)
        assert int(response.headers["Retry-After"]) >= 1
        assert "cannot answer before the deadline" in (await response.json())["error"]
        assert slow_router.reached == reached, "a refused request reached the router"
        gate.set()
        assert all(r.status == 200 for r in await asyncio.gather(*loose))
        assert registry.get_sample_value("infermesh_gateway_overload_refusals_total") == 1
    finally:
        await client.close()


async def test_admission_off_never_refuses_at_the_gateway(slow_router: _SlowRouter) -> None:
    registry = CollectorRegistry()
    client = await _client(slow_router, registry, admission="off")
    try:
        await asyncio.gather(*(client.post("/v2/models/m/infer", json=_body(10.0))
                               for _ in range(30)))
        loose = asyncio.ensure_future(client.post("/v2/models/m/infer", json=_body(10.0)))
        await wait_for(lambda: slow_router.reached == 31, timeout=10.0,
                       what="the loose request at the router")
        response = await client.post("/v2/models/m/infer", json=_body(0.05))
        assert response.status == 504  # it waited for its deadline, as a static batcher does
        assert (await loose).status == 200
        assert registry.get_sample_value("infermesh_gateway_overload_refusals_total") == 0
    finally:
        await client.close()
