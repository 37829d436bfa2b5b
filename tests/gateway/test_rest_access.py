"""Auth and quotas through the REST adapter: statuses, WWW-Authenticate, Retry-After, and the
endpoints that stay open; aiohttp's test client over the echo models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import FakeClock, add_tenant, bearer, revoke

BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
INFER = "/v2/models/echo/infer"


@pytest.fixture
def config() -> StaticConfig:
    return echo_config()


@pytest.fixture
def router() -> EchoRouter:
    return EchoRouter()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def client(
    config: StaticConfig, router: EchoRouter, clock: FakeClock, registry: CollectorRegistry
) -> AsyncIterator[TestClient[Any, Any]]:
    core = Gateway(ModelCatalog(config), router, access=Access(config, clock=clock),
                   metrics=GatewayMetrics(registry))
    client = TestClient(TestServer(create_app(core, max_body_bytes=4096)))
    await client.start_server()
    yield client
    await client.close()


async def test_a_request_without_a_key_is_401_with_a_bearer_challenge(
    client: TestClient[Any, Any], router: EchoRouter
) -> None:
    response = await client.post(INFER, json=BODY)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in (await response.json())["error"]
    assert router.seen == []


@pytest.mark.parametrize("authorization", [
    "Bearer imk_000000000000_unknown", "Basic dXNlcjpwdw==", "Bearer",
])
async def test_a_bad_key_is_401(
    client: TestClient[Any, Any], config: StaticConfig, authorization: str
) -> None:
    add_tenant(config, "acme")
    response = await client.post(INFER, json=BODY, headers={"Authorization": authorization})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_valid_key_is_served_as_its_tenant(
    client: TestClient[Any, Any], config: StaticConfig, router: EchoRouter
) -> None:
    key = add_tenant(config, "acme")
    response = await client.post(INFER, json=BODY, headers=bearer(key))
    assert response.status == 200
    assert router.seen[0].tenant == "acme"
    response = await client.post(INFER, json=BODY, headers={"X-Api-Key": key})
    assert response.status == 200


async def test_a_revoked_key_is_401_on_the_next_request(
    client: TestClient[Any, Any], config: StaticConfig
) -> None:
    key = add_tenant(config, "acme")
    assert (await client.post(INFER, json=BODY, headers=bearer(key))).status == 200
    revoke(config, key)
    assert (await client.post(INFER, json=BODY, headers=bearer(key))).status == 401


async def test_a_forbidden_model_or_a_disabled_tenant_is_403(
    client: TestClient[Any, Any], config: StaticConfig
) -> None:
    key = add_tenant(config, "acme", allowed_models=["pair"])
    response = await client.post(INFER, json=BODY, headers=bearer(key))
    assert response.status == 403
    assert "WWW-Authenticate" not in response.headers
    assert "'echo'" in (await response.json())["error"]
    disabled = add_tenant(config, "gone", disabled=True)
    assert (await client.post(INFER, json=BODY, headers=bearer(disabled))).status == 403


async def test_over_quota_is_429_with_retry_after(
    client: TestClient[Any, Any], config: StaticConfig, clock: FakeClock
) -> None:
    key = add_tenant(config, "acme", rate=4, burst=1)
    assert (await client.post(INFER, json=BODY, headers=bearer(key))).status == 200
    response = await client.post(INFER, json=BODY, headers=bearer(key))
    assert response.status == 429
    assert response.headers["Retry-After"] == "1"  # whole seconds, rounded up
    body = await response.json()
    assert body["retry_after"] == pytest.approx(0.25)
    assert "'acme'" in body["error"]
    clock.advance(0.25)
    assert (await client.post(INFER, json=BODY, headers=bearer(key))).status == 200


async def test_retry_after_rounds_up(
    client: TestClient[Any, Any], config: StaticConfig
) -> None:
    key = add_tenant(config, "acme", rate=0.4, burst=1)
    await client.post(INFER, json=BODY, headers=bearer(key))
    response = await client.post(INFER, json=BODY, headers=bearer(key))
    assert response.headers["Retry-After"] == "3"  # 2.5 s


async def test_access_is_settled_before_the_body_is_read(
    client: TestClient[Any, Any], config: StaticConfig
) -> None:
    """An unauthenticated huge body is a 401, and a tenant over quota gets 429 for bad JSON."""
    assert (await client.post(INFER, data=b"x" * 10_000)).status == 401
    key = add_tenant(config, "acme", rate=1, burst=1)
    assert (await client.post(INFER, data=b"{", headers=bearer(key))).status == 400
    assert (await client.post(INFER, data=b"{", headers=bearer(key))).status == 429


async def test_model_endpoints_need_a_key(
    client: TestClient[Any, Any], config: StaticConfig
) -> None:
    key = add_tenant(config, "acme", allowed_models=["echo"])
    for path in ("/v2/models/echo", "/v2/models/echo/ready", "/v2/models/echo/versions/1"):
        assert (await client.get(path)).status == 401, path
        assert (await client.get(path, headers=bearer(key))).status == 200, path
    assert (await client.get("/v2/models/pair", headers=bearer(key))).status == 403


@pytest.mark.parametrize("path", ["/v2", "/v2/health/live", "/v2/health/ready", "/metrics"])
async def test_server_endpoints_stay_open(client: TestClient[Any, Any], path: str) -> None:
    assert (await client.get(path)).status == 200


async def test_refused_requests_are_counted_without_their_model_name(
    client: TestClient[Any, Any], config: StaticConfig, registry: CollectorRegistry
) -> None:
    key = add_tenant(config, "acme", rate=1, burst=1)
    await client.post("/v2/models/scan-me/infer", json=BODY)
    await client.post(INFER, json=BODY, headers=bearer(key))
    await client.post(INFER, json=BODY, headers=bearer(key))
    count = registry.get_sample_value
    labels = {"protocol": "rest"}
    assert count("infermesh_gateway_requests_total",
                 {**labels, "model": "_unknown", "code": "401"}) == 1
    assert count("infermesh_gateway_requests_total",
                 {**labels, "model": "scan-me", "code": "401"}) is None
    assert count("infermesh_gateway_requests_total",
                 {**labels, "model": "echo", "code": "429"}) == 1
    assert count("infermesh_gateway_tenant_requests_total",
                 {"tenant": "acme", "code": "ok"}) == 1
