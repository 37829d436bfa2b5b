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
from services.gateway.overload import REMEMBERED_KEYS, OverloadGuard
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import Overloaded
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    Rollout,
    Route,
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


# --- the batcher's refusals, remembered -----------------------------------------------------

KEY = ("1", "acme", "realtime")


def test_a_remembered_refusal_covers_later_deadlines_until_the_backlog_clears() -> None:
    clock = Clock()
    guard = OverloadGuard(clock=clock)
    # Refused with 1 s left: the rows due before it clear in 2.5 s.
    guard.remember("m", KEY, clock.now + 1.0, Overloaded("no", retry_after=2.5, busy_for=2.5))
    assert guard.remembers("m") and not guard.remembers("other")
    clock.now += 0.2
    with pytest.raises(Overloaded) as refused:  # due later, before the backlog clears
        guard.check_remembered("m", KEY, clock.now + 1.0)
    assert refused.value.retry_after == pytest.approx(2.3)
    assert guard.refused_remembered == 1
    guard.check_remembered("m", KEY, clock.now + 0.5)  # due sooner: may stand ahead (EDF)
    guard.check_remembered("m", KEY, clock.now + 2.4)  # due after the backlog clears
    guard.check_remembered("m", ("1", "other-tenant", "realtime"), clock.now + 1.0)
    guard.check_remembered("m", ("2", "acme", "realtime"), clock.now + 1.0)
    guard.check_remembered("m", ("1", "acme", "bulk"), clock.now + 1.0)
    clock.now += 2.4  # the backlog has cleared: forwarded again, and forgotten
    guard.check_remembered("m", KEY, clock.now + 0.1)
    assert not guard.remembers("m")


def test_only_a_refusal_that_says_how_long_it_holds_is_remembered() -> None:
    clock = Clock()
    guard = OverloadGuard(clock=clock)
    guard.remember("m", KEY, clock.now + 1.0, Overloaded("queue full", retry_after=5.0))
    guard.remember("m", KEY, clock.now + 1.0, Overloaded("soon", retry_after=0.5, busy_for=0.5))
    assert not guard.remembers("m")  # no `busy_for`; one that ends before its own deadline


def test_remembered_spans_merge_and_stay_few() -> None:
    clock = Clock()
    guard = OverloadGuard(clock=clock)
    guard.remember("m", KEY, clock.now + 1.0, Overloaded("a", busy_for=2.0))
    guard.remember("m", KEY, clock.now + 1.5, Overloaded("b", busy_for=3.0))  # overlaps: merged
    with pytest.raises(Overloaded):
        guard.check_remembered("m", KEY, clock.now + 2.9)
    for i in range(10):  # disjoint spans, each ending later: only the latest few are kept
        guard.remember("m", KEY, clock.now + 10.0 * (i + 1),
                       Overloaded("c", busy_for=10.0 * (i + 1) + 1.0))
    with pytest.raises(Overloaded):
        guard.check_remembered("m", KEY, clock.now + 100.5)
    guard.check_remembered("m", KEY, clock.now + 2.9)  # the earliest-ending span was dropped


class _RefusingRouter(_SlowRouter):
    """Refuses as a batcher does while `busy_for` is set (seconds its backlog needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.busy_for: float | None = None

    async def infer(self, request: InferRequest) -> InferResponse:
        if self.busy_for is not None:
            self.reached += 1
            raise Overloaded("m/1 cannot answer before the deadline", retry_after=self.busy_for,
                             busy_for=self.busy_for)
        return await super().infer(request)


def _canary(records: dict[str, object]) -> dict[str, object]:
    records["rollouts/m"] = Rollout("m", (Route("1", 90.0), Route("2", 10.0)),
                                    fallback="1").to_json()
    return records


@pytest.mark.parametrize("rollout", ["stable", "canary"])
async def test_a_batcher_refusal_refuses_later_deadlines_at_the_gateway(rollout: str) -> None:
    """The batcher refused a request with 1 s left because its backlog needs 5 s: a request
    due later than that one but before the backlog clears is refused by the gateway without
    reaching the router; one due sooner, or after, is forwarded. Under a canary the gateway
    cannot tell which version a request will get, and remembers nothing."""
    router, registry, clock = _RefusingRouter(), CollectorRegistry(), Clock()  # time stands
    records = model_records("m", SIGNATURE, versions=("1", "2"))
    config = StaticConfig(_canary(records) if rollout == "canary" else records)
    core = Gateway(ModelCatalog(config), router, access=Access(config, auth=False),
                   metrics=GatewayMetrics(registry), clock=clock,
                   overload=OverloadGuard(clock=clock))
    client = TestClient(TestServer(create_app(core)))
    await client.start_server()
    try:
        router.busy_for = 5.0
        assert (await client.post("/v2/models/m/infer", json=_body(1.0))).status == 503
        assert router.reached == 1
        router.busy_for = None  # the batcher would admit now; the gateway does not know it
        response = await client.post("/v2/models/m/infer", json=_body(2.0))
        sample = registry.get_sample_value("infermesh_gateway_remembered_refusals_total")
        if rollout == "canary":
            assert response.status == 200 and router.reached == 2 and sample == 0
            return
        assert response.status == 503, await response.text()
        assert int(response.headers["Retry-After"]) >= 1
        assert "backlog" in (await response.json())["error"]
        assert router.reached == 1, "a remembered refusal reached the router"
        assert sample == 1
        # Due sooner than the refused one (it may run ahead of its backlog), or pinned to
        # another version, or due after the backlog clears: forwarded.
        assert (await client.post("/v2/models/m/infer", json=_body(0.5))).status == 200
        assert (await client.post("/v2/models/m/versions/2/infer",
                                  json=_body(2.0))).status == 200
        assert (await client.post("/v2/models/m/infer", json=_body(10.0))).status == 200
        assert router.reached == 4
    finally:
        await client.close()


def test_tenants_whose_refusals_ended_are_forgotten() -> None:
    clock = Clock()
    guard = OverloadGuard(clock=clock)
    for i in range(200):  # 200 tenants refused once each, a second apart
        guard.remember("m", ("1", f"t{i}", "realtime"), clock.now + 1.0,
                       Overloaded("no", busy_for=2.0))
        clock.now += 1.0
    assert len(guard._refusals["m"]) <= REMEMBERED_KEYS + 2  # only those not yet ended stay
