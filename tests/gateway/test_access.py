"""Auth and quotas through the gateway core, over the echo models and a router that can hold
or fail requests; a fake clock drives the token buckets."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.core import Gateway
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import (
    InfermeshError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
)
from services.mesh.domain.tenancy import Tenant
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, InferResponse
from services.mesh.infra.settings import load_settings
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import FakeClock, add_tenant, bearer, lookup, revoke


class GatedRouter(EchoRouter):
    """The echo router, which can fail the next requests or hold them until released."""

    def __init__(self) -> None:
        super().__init__()
        self.error: InfermeshError | None = None
        self.hold: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    async def infer(self, request: InferRequest) -> InferResponse:
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            self.seen.append(request)
            raise self.error
        return await super().infer(request)


@pytest.fixture
def config() -> StaticConfig:
    return echo_config()


@pytest.fixture
def router() -> GatedRouter:
    return GatedRouter()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def make_gateway(config: StaticConfig, router: GatedRouter, clock: FakeClock,
                 registry: CollectorRegistry, *, auth: bool = True,
                 default_model_max_concurrency: int = 0) -> Gateway:
    access = Access(config, clock=clock, auth=auth,
                    default_model_max_concurrency=default_model_max_concurrency)
    return Gateway(ModelCatalog(config), router, access=access, metrics=GatewayMetrics(registry))


@pytest.fixture
def gateway(config: StaticConfig, router: GatedRouter, clock: FakeClock,
            registry: CollectorRegistry) -> Gateway:
    return make_gateway(config, router, clock, registry)


async def call(gateway: Gateway, key: str | None, model: str = "echo") -> InferResponse:
    """One request through the core as an adapter makes it."""
    header = lookup({} if key is None else bearer(key))
    with gateway.admit(model, None, header=header) as admission:
        tensor = Tensor.from_array("features", np.zeros((1, 2), dtype=np.float32))
        request = InferRequest(model, [tensor], request_id="r")
        return await gateway.infer(request, admission=admission, header=header)


async def refusal(gateway: Gateway, key: str | None, model: str = "echo") -> InfermeshError:
    with pytest.raises(InfermeshError) as caught:
        await call(gateway, key, model)
    return caught.value


async def test_auth_off_serves_everyone_as_anonymous_without_quota(
    config: StaticConfig, router: GatedRouter, clock: FakeClock, registry: CollectorRegistry
) -> None:
    gateway = make_gateway(config, router, clock, registry, auth=False)
    add_tenant(config, "anonymous", rate=0.001, burst=1, max_concurrency=1)  # ignored
    for _ in range(50):
        await call(gateway, None)
    await call(gateway, "imk_000000000000_whatever")
    assert {(r.tenant, r.lane) for r in router.seen} == {("anonymous", "realtime")}
    assert len(router.seen) == 51


async def test_the_tenant_and_its_lane_reach_the_router(
    gateway: Gateway, config: StaticConfig, router: GatedRouter
) -> None:
    key = add_tenant(config, "acme", priority_class="bulk")
    await call(gateway, key)
    assert (router.seen[0].tenant, router.seen[0].lane) == ("acme", "bulk")


async def test_auth_comes_before_the_model_and_the_model_before_quota(
    gateway: Gateway, config: StaticConfig, router: GatedRouter
) -> None:
    key = add_tenant(config, "acme", rate=1, burst=1)
    fenced = add_tenant(config, "fenced", allowed_models=["echo"])
    assert isinstance(await refusal(gateway, "imk_000000000000_bad", "nope"), Unauthenticated)
    assert isinstance(await refusal(gateway, fenced, "nope"), PermissionDenied)
    assert isinstance(await refusal(gateway, key, "nope"), NotFound)
    await call(gateway, key)  # the 404 took no token
    assert isinstance(await refusal(gateway, key), QuotaExceeded)
    assert len(router.seen) == 1


async def test_a_revoked_key_is_refused_at_once(
    gateway: Gateway, config: StaticConfig
) -> None:
    key = add_tenant(config, "acme")
    await call(gateway, key)
    revoke(config, key)
    assert isinstance(await refusal(gateway, key), Unauthenticated)


async def test_over_rate_the_error_names_the_tenant_and_when_to_retry(
    gateway: Gateway, config: StaticConfig, clock: FakeClock
) -> None:
    key = add_tenant(config, "acme", rate=4, burst=1)
    await call(gateway, key)
    error = await refusal(gateway, key)
    assert isinstance(error, QuotaExceeded)
    assert "'acme'" in error.message and "rate" in error.message
    assert error.retry_after == pytest.approx(0.25)
    clock.advance(0.25)
    await call(gateway, key)


async def test_a_slot_is_released_when_the_router_fails(
    gateway: Gateway, config: StaticConfig, router: GatedRouter
) -> None:
    key = add_tenant(config, "acme", max_concurrency=1)
    router.error = Unavailable("no ready worker")
    assert isinstance(await refusal(gateway, key), Unavailable)
    router.error = None
    await call(gateway, key)


async def test_a_slot_is_released_when_the_request_is_cancelled(
    gateway: Gateway, config: StaticConfig, router: GatedRouter
) -> None:
    key = add_tenant(config, "acme", max_concurrency=1)
    router.hold = asyncio.Event()
    first = asyncio.create_task(call(gateway, key))
    await router.arrived.wait()
    busy = await refusal(gateway, key)
    assert isinstance(busy, QuotaExceeded) and busy.retry_after == pytest.approx(0.1)
    assert "concurrency" in busy.message
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    router.hold = None
    await call(gateway, key)


async def test_a_limits_record_caps_a_models_concurrency_across_tenants(
    gateway: Gateway, config: StaticConfig, router: GatedRouter
) -> None:
    first, second = add_tenant(config, "a"), add_tenant(config, "b")
    config.put("limits/echo", {"model": "echo", "max_concurrency": 1})
    router.hold = asyncio.Event()
    held = asyncio.create_task(call(gateway, first))
    await router.arrived.wait()
    error = await refusal(gateway, second)
    assert isinstance(error, QuotaExceeded) and "'echo'" in error.message
    router.hold.set()
    await held
    await call(gateway, second)


async def test_the_default_model_cap_applies_without_a_limits_record(
    config: StaticConfig, router: GatedRouter, clock: FakeClock, registry: CollectorRegistry
) -> None:
    gateway = make_gateway(config, router, clock, registry, default_model_max_concurrency=1)
    key = add_tenant(config, "acme")
    router.hold = asyncio.Event()
    held = asyncio.create_task(call(gateway, key))
    await router.arrived.wait()
    assert isinstance(await refusal(gateway, key), QuotaExceeded)
    router.hold.set()
    await held


async def test_gateway_replicas_in_etcd_share_the_quota(
    gateway: Gateway, config: StaticConfig
) -> None:
    config.put("endpoints/gateway/g1", {"http": "http://g1"})
    config.put("endpoints/gateway/g2", {"http": "http://g2"})
    key = add_tenant(config, "acme", rate=100, burst=10)
    for _ in range(5):
        await call(gateway, key)
    assert isinstance(await refusal(gateway, key), QuotaExceeded)  # 10 / 2 replicas
    config.delete("endpoints/gateway/g2")
    assert isinstance(await refusal(gateway, key), QuotaExceeded)  # no free burst


async def test_refusals_and_outcomes_are_counted(
    gateway: Gateway, config: StaticConfig, registry: CollectorRegistry
) -> None:
    key = add_tenant(config, "acme", rate=1, burst=1, allowed_models=["echo"])
    await refusal(gateway, None)
    await call(gateway, key)
    await refusal(gateway, key)
    await refusal(gateway, key, "pair")
    count = registry.get_sample_value
    assert count("infermesh_gateway_auth_failures_total", {"reason": "missing"}) == 1
    assert count("infermesh_gateway_auth_failures_total", {"reason": "forbidden_model"}) == 1
    assert count("infermesh_gateway_auth_failures_total", {"reason": "revoked"}) == 0
    assert count("infermesh_gateway_quota_rejections_total",
                 {"tenant": "acme", "limit": "rate"}) == 1
    assert count("infermesh_gateway_tenant_requests_total", {"tenant": "acme", "code": "ok"}) == 1
    assert count("infermesh_gateway_tenant_requests_total",
                 {"tenant": "acme", "code": "quota_exceeded"}) == 1


def test_auth_off_is_a_setting_that_shouts_once(
    config: StaticConfig, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(GatewaySettings, "gateway", env={"INFERMESH_GATEWAY_AUTH": "0"})
    assert settings.auth is False
    assert load_settings(GatewaySettings, "gateway", env={}).auth is True
    with caplog.at_level(logging.WARNING):
        access = Access.from_settings(config, settings)
    assert [r.levelname for r in caplog.records if "AUTH IS OFF" in r.message] == ["WARNING"]
    anonymous = access.authorize("echo", lookup({}))
    assert isinstance(anonymous, Tenant) and anonymous.name == "anonymous"
