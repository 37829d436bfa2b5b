"""`PUT /v1/features/{type}/{id}` and `POST /v1/features/{type}:bulk` through the REST adapter:
stored in a real Postgres under the key's tenant, the newest event time winning, 400s naming the
field, 401 without a key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.feature_store import open_feature_writes
from services.gateway.features import FeatureWriter
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.infra.db import create_pool, migrate
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import add_tenant, bearer

Client = TestClient[Any, Any]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url)
    await migrate(pool)
    yield pool
    await pool.close()


@pytest.fixture
def config() -> StaticConfig:
    return echo_config()


@pytest.fixture
async def client(
    config: StaticConfig, database_url: str, pool: asyncpg.Pool
) -> AsyncIterator[Client]:
    async with AsyncExitStack() as stack:
        access = Access(config, auth=True)
        core = Gateway(ModelCatalog(config), EchoRouter(), access=access,
                       metrics=GatewayMetrics(CollectorRegistry()))
        store = await stack.enter_async_context(open_feature_writes(database_url))
        writer = FeatureWriter(access, store, metrics=core.metrics)
        client = TestClient(TestServer(create_app(core, features=writer)))
        await client.start_server()
        stack.push_async_callback(client.close)
        yield client


async def _rows(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await pool.fetch("SELECT tenant, entity_type, entity_id, name, value, "
                            "extract(epoch FROM event_time)::int AS t FROM features "
                            "ORDER BY entity_id, name")
    return [tuple(row) for row in rows]


async def test_put_and_bulk_store_the_tenants_rows_newest_first(
    client: Client, config: StaticConfig, pool: asyncpg.Pool
) -> None:
    key = add_tenant(config, "acme")
    body = {"features": {"age": 31, "spend": 2.5}, "event_time": "2026-01-01T00:00:00Z"}
    response = await client.put("/v1/features/user/u1", json=body, headers=bearer(key))
    assert response.status == 200 and await response.json() == {"stored": 2}
    bulk = {"rows": [
        {"entity_id": "u1", "features": {"age": 30}, "event_time": 1_700_000_000},  # older
        {"entity_id": "u2", "features": {"age": 50}, "event_time": 1_800_000_000},
    ]}
    response = await client.post("/v1/features/user:bulk", json=bulk, headers=bearer(key))
    assert response.status == 200 and await response.json() == {"stored": 1}
    assert await _rows(pool) == [
        ("acme", "user", "u1", "age", 31, 1_767_225_600),
        ("acme", "user", "u1", "spend", 2.5, 1_767_225_600),
        ("acme", "user", "u2", "age", 50, 1_800_000_000),
    ]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/features/user/u1", {"features": {"age": "old"}}, "features.age"),
    ("/v1/features/user/u1", {"features": {}}, "features"),
    ("/v1/features/user/u1", {"features": {"a": 1}, "event_time": "yesterday"}, "event_time"),
    ("/v1/features/user/u1", {"features": {"a": 1}, "colour": 1}, "colour"),
    ("/v1/features/user:bulk", {"rows": [{"features": {"a": 1}}]}, "rows[0].entity_id"),
    ("/v1/features/user:bulk", {"rows": [{"entity_id": "u", "features": {"a": None}}]},
     "rows[0].features.a"),
    ("/v1/features/user:bulk", {"rows": []}, "rows"),
])
async def test_a_bad_body_is_400_naming_the_field(
    client: Client, config: StaticConfig, path: str, body: dict[str, Any], field: str
) -> None:
    key = add_tenant(config, "acme")
    method = client.post if path.endswith(":bulk") else client.put
    response = await method(path, json=body, headers=bearer(key))
    assert response.status == 400
    assert (await response.json())["error"].startswith(field)


async def test_without_a_key_it_is_401(client: Client) -> None:
    response = await client.put("/v1/features/user/u1", json={"features": {"a": 1}})
    assert response.status == 401
