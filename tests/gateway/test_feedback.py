"""`POST /v1/feedback` through the REST adapter: stored in a real Postgres by the key's tenant,
idempotent per (request id, kind), 400s naming the field, 401/403 as for inference, and a
bounded 503 when Postgres is away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from deploy.localdeps import free_port
from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.feedback import FeedbackRecorder
from services.gateway.feedback_store import open_feedback_store
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.infra.db import create_pool, migrate
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import add_tenant, bearer, revoke

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]
FEEDBACK = "/v1/feedback"
INFER_BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                          "data": [1, 2]}]}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The test database, migrated as `infermesh up` does it (the gateway never migrates)."""
    pool = await create_pool(database_url)
    await migrate(pool)
    yield pool
    await pool.close()


@pytest.fixture
def config() -> StaticConfig:
    return echo_config()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def gateway(
    config: StaticConfig, registry: CollectorRegistry
) -> AsyncIterator[ClientFactory]:
    """Builds a gateway app over `dsn` (auth as asked) and returns a started test client."""
    async with AsyncExitStack() as stack:

        async def start(dsn: str, *, auth: bool = True, timeout: float = 2.0) -> Client:
            access = Access(config, auth=auth)
            core = Gateway(ModelCatalog(config), EchoRouter(), access=access,
                           metrics=GatewayMetrics(registry))
            store = await stack.enter_async_context(open_feedback_store(dsn, timeout=timeout))
            recorder = FeedbackRecorder(access, store, metrics=core.metrics)
            client = TestClient(TestServer(create_app(core, feedback=recorder)))
            await client.start_server()
            stack.push_async_callback(client.close)
            return client

        yield start


@pytest.fixture
async def client(gateway: ClientFactory, database_url: str, pool: asyncpg.Pool) -> Client:
    return await gateway(database_url)


async def _rows(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT tenant, request_id, kind, label, score FROM feedback ORDER BY kind, tenant"
    )
    return [dict(row) for row in rows]


async def test_feedback_is_stored_under_the_keys_tenant(
    client: Client, config: StaticConfig, pool: asyncpg.Pool
) -> None:
    key = add_tenant(config, "acme")
    response = await client.post(FEEDBACK, json={"request_id": "r-1", "label": "cat"},
                                 headers=bearer(key))
    assert response.status == 200
    assert await response.json() == {"request_id": "r-1", "kind": "label", "stored": True}
    assert await _rows(pool) == [
        {"tenant": "acme", "request_id": "r-1", "kind": "label", "label": "cat", "score": None}
    ]


async def test_posting_the_same_kind_again_replaces_the_value(
    client: Client, config: StaticConfig, pool: asyncpg.Pool
) -> None:
    key = add_tenant(config, "acme")
    for label in ("cat", "dog", "dog"):
        response = await client.post(FEEDBACK, json={"request_id": "r-1", "label": label},
                                     headers=bearer(key))
        assert response.status == 200
    rows = await _rows(pool)
    assert [(r["kind"], r["label"]) for r in rows] == [("label", "dog")]


async def test_labels_scores_and_explicit_kinds_are_separate_feedback(
    client: Client, config: StaticConfig, pool: asyncpg.Pool
) -> None:
    key = add_tenant(config, "acme")
    posts = [
        ({"request_id": "r-1", "label": 3}, "label"),
        ({"request_id": "r-1", "score": 0.25}, "score"),
        ({"request_id": "r-1", "score": 4, "kind": "csat"}, "csat"),
        ({"request_id": "r-1", "label": True, "kind": "fraud.confirmed"}, "fraud.confirmed"),
    ]
    for body, kind in posts:
        response = await client.post(FEEDBACK, json=body, headers=bearer(key))
        assert (await response.json())["kind"] == kind
    assert [(r["kind"], r["label"], r["score"]) for r in await _rows(pool)] == [
        ("csat", None, 4.0), ("fraud.confirmed", "true", None), ("label", "3", None),
        ("score", None, 0.25),
    ]


async def test_the_same_request_id_of_two_tenants_is_two_rows(
    client: Client, config: StaticConfig, pool: asyncpg.Pool
) -> None:
    for tenant, label in (("acme", "cat"), ("globex", "dog")):
        key = add_tenant(config, tenant, allowed_models=["pair"])  # no model is checked
        response = await client.post(FEEDBACK, json={"request_id": "r-1", "label": label},
                                     headers=bearer(key))
        assert response.status == 200
    assert [(r["tenant"], r["label"]) for r in await _rows(pool)] == [
        ("acme", "cat"), ("globex", "dog")
    ]


@pytest.mark.parametrize(("body", "error"), [
    ({"label": "cat"}, "request_id: required"),
    ({"request_id": "", "label": "cat"}, "request_id: must be a string of 1 to 128"),
    ({"request_id": "r" * 129, "label": "cat"}, "request_id: must be a string of 1 to 128"),
    ({"request_id": 7, "label": "cat"}, "request_id: must be a string"),
    ({"request_id": "r\x00", "label": "cat"}, "request_id: must be printable ASCII"),
    ({"request_id": "a\r\nX: 1", "label": "cat"}, "request_id: must be printable ASCII"),
    ({"request_id": "caf\u00e9", "label": "cat"}, "request_id: must be printable ASCII"),
    ({"request_id": " padded", "label": "cat"}, "request_id: must not start or end with a"),
    ({"request_id": "r-1"}, "label, score: give exactly one"),
    ({"request_id": "r-1", "label": "cat", "score": 1}, "label, score: give exactly one"),
    ({"request_id": "r-1", "label": 0.5}, "label: must be a string, an integer or a boolean"),
    ({"request_id": "r-1", "label": None}, "label: must be a string, an integer or a boolean"),
    ({"request_id": "r-1", "label": ""}, "label: must be 1 to 1024 characters"),
    ({"request_id": "r-1", "score": "high"}, "score: must be a finite number"),
    ({"request_id": "r-1", "score": True}, "score: must be a finite number"),
    ({"request_id": "r-1", "label": "cat", "kind": "Label"}, "kind: must match"),
    ({"request_id": "r-1", "label": "cat", "kind": ""}, "kind: must match"),
    ({"request_id": "r-1", "label": "cat", "model": "mlp"}, "model: unknown field"),
    ([{"request_id": "r-1"}], "body: must be a JSON object"),
    (b"{not json", "body: malformed JSON"),
    (b"", "body: malformed JSON"),
])
async def test_a_bad_body_is_400_naming_the_field(
    client: Client, config: StaticConfig, pool: asyncpg.Pool, registry: CollectorRegistry,
    body: Any, error: str,
) -> None:
    key = add_tenant(config, "acme")
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await client.post(FEEDBACK, data=data, headers={
        **bearer(key), "Content-Type": "application/json"})
    assert response.status == 400
    answer = await response.json()
    assert answer["error"].startswith(error), answer
    assert "Traceback" not in answer["error"]
    assert await _rows(pool) == []
    outcome = {"tenant": "acme", "outcome": "invalid_input"}
    assert registry.get_sample_value("infermesh_feedback_total", outcome) == 1


async def test_a_huge_body_is_413(client: Client, config: StaticConfig) -> None:
    key = add_tenant(config, "acme")
    body = {"request_id": "r-1", "label": "x" * 20_000}
    response = await client.post(FEEDBACK, json=body, headers=bearer(key))
    assert response.status == 413


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer imk_000000000000_nope"},
                                     {"Authorization": "Basic dXNlcjpwdw=="}])
async def test_no_key_or_a_bad_key_is_401(
    client: Client, config: StaticConfig, pool: asyncpg.Pool, headers: dict[str, str]
) -> None:
    add_tenant(config, "acme")
    response = await client.post(FEEDBACK, json={"request_id": "r-1", "label": "cat"},
                                 headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await _rows(pool) == []


async def test_a_revoked_key_is_401_and_a_disabled_tenant_403(
    client: Client, config: StaticConfig, registry: CollectorRegistry
) -> None:
    key = add_tenant(config, "acme")
    body = {"request_id": "r-1", "label": "cat"}
    assert (await client.post(FEEDBACK, json=body, headers=bearer(key))).status == 200
    revoke(config, key)
    assert (await client.post(FEEDBACK, json=body, headers=bearer(key))).status == 401
    assert registry.get_sample_value("infermesh_gateway_auth_failures_total",
                                     {"reason": "revoked"}) == 1
    disabled = add_tenant(config, "gone", disabled=True)
    assert (await client.post(FEEDBACK, json=body, headers=bearer(disabled))).status == 403


async def test_with_auth_off_feedback_is_the_anonymous_tenants(
    gateway: ClientFactory, database_url: str, pool: asyncpg.Pool
) -> None:
    client = await gateway(database_url, auth=False)
    response = await client.post(FEEDBACK, json={"request_id": "r-1", "score": -1.5})
    assert response.status == 200
    assert await _rows(pool) == [
        {"tenant": "anonymous", "request_id": "r-1", "kind": "score", "label": None,
         "score": -1.5}
    ]


async def _assert_503_soon(client: Client, key: str, *, within: float) -> str:
    started = time.monotonic()
    response = await client.post(FEEDBACK, json={"request_id": "r-1", "label": "cat"},
                                 headers=bearer(key))
    assert time.monotonic() - started < within
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    error: str = (await response.json())["error"]
    return error


async def test_postgres_on_a_closed_port_is_503_and_inference_still_works(
    gateway: ClientFactory, config: StaticConfig, registry: CollectorRegistry
) -> None:
    client = await gateway(f"postgresql://infermesh@127.0.0.1:{free_port()}/nowhere")
    key = add_tenant(config, "acme")
    error = await _assert_503_soon(client, key, within=2.0)
    assert "database is unreachable" in error and "127.0.0.1" not in error
    assert registry.get_sample_value(
        "infermesh_feedback_total", {"tenant": "acme", "outcome": "unavailable"}) == 1
    infer = await client.post("/v2/models/echo/infer", json=INFER_BODY, headers=bearer(key))
    assert infer.status == 200


async def test_a_postgres_that_never_answers_is_503_after_the_timeout(
    gateway: ClientFactory, config: StaticConfig
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept the connection, never answer the startup message

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await gateway(f"postgresql://infermesh@127.0.0.1:{port}/db", timeout=0.5)
        key = add_tenant(config, "acme")
        assert "database is unreachable" in await _assert_503_soon(client, key, within=2.0)
        assert accepted, "the gateway never tried to connect"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_without_a_database_feedback_is_503(
    gateway: ClientFactory, config: StaticConfig
) -> None:
    client = await gateway("")
    key = add_tenant(config, "acme")
    assert "no database configured" in await _assert_503_soon(client, key, within=1.0)


async def test_without_a_recorder_there_is_no_feedback_route(config: StaticConfig) -> None:
    core = Gateway(ModelCatalog(config), EchoRouter(), access=Access(config))
    async with TestClient(TestServer(create_app(core))) as client:
        assert (await client.post(FEEDBACK, json={})).status == 404
