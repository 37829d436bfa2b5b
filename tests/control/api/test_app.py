from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control.api.app import create_app
from control.api.core import RolloutState, RolloutStore
from control.api.openapi import openapi_document
from control.api.rollouts.routes import parse_if_match
from control.api.tenants.store import TenantStore
from services.mesh.domain.errors import InvalidInput
from tests.control.api.conftest import ControlHarness, canary

Client = TestClient[web.Request, web.Application]
TOKENS = {"alice-secret": "alice", "bob-secret": "bob"}
ALICE = {"Authorization": "Bearer alice-secret"}
BOB = {"Authorization": "Bearer bob-secret"}


@pytest.fixture
async def client(control: ControlHarness) -> AsyncIterator[Client]:
    app = create_app(control.store, TOKENS, tenants=control.tenants)
    async with TestClient(TestServer(app)) as client:
        yield client


async def _put(client: Client, body: Any, **headers: str) -> Any:
    return await client.put("/v1/rollouts/iris", json=body, headers={**ALICE, **headers})


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic alice-secret"},
     {"Authorization": "Bearer"}],
)
async def test_a_missing_or_wrong_token_is_401(client: Client, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/rollouts/iris"), ("PUT", "/v1/rollouts/iris"),
                         ("GET", "/v1/models"), ("GET", "/v1/nowhere")):
        response = await client.request(method, path, headers=headers, json=canary())
        assert response.status == 401, (method, path)
        assert "token" in (await response.json())["error"]
        assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_health_metrics_and_openapi_need_no_token(client: Client) -> None:
    assert await (await client.get("/v1/health")).json() == {"status": "ok"}
    await client.get("/v1/rollouts/iris", headers=ALICE)
    metrics = await (await client.get("/metrics")).text()
    assert 'route="/v1/rollouts/{model}",status="200"' in metrics
    assert (await client.get("/openapi.json")).status == 200


async def test_etag_round_trip_and_a_stale_if_match_is_412(
    client: Client, control: ControlHarness
) -> None:
    read = await client.get("/v1/rollouts/iris", headers=ALICE)
    assert read.headers["ETag"] == '"1"'
    record = await read.json()
    assert record["epoch"] == 1 and record["updated_at"]
    written = await _put(client, canary(10), **{"If-Match": read.headers["ETag"]})
    assert written.status == 200 and written.headers["ETag"] == '"2"'
    assert await written.json() == await control.published()
    stale = await _put(client, canary(20), **{"If-Match": read.headers["ETag"]})
    assert stale.status == 412
    assert (await stale.json())["epoch"] == 2
    assert "epoch 2" in (await stale.json())["error"]
    assert (await _put(client, canary(20), **{"If-Match": "*"})).headers["ETag"] == '"3"'


@pytest.mark.parametrize(
    ("header", "epoch"), [('"5"', 5), ("5", 5), ('W/"5"', 5), (" 7 ", 7), ("*", None), (None, None)]
)
def test_if_match_forms(header: str | None, epoch: int | None) -> None:
    assert parse_if_match(header) == epoch


async def test_a_malformed_if_match_is_400(client: Client) -> None:
    response = await _put(client, canary(), **{"If-Match": '"v5"'})
    assert response.status == 400
    assert (await response.json())["error"].startswith("If-Match:")
    with pytest.raises(InvalidInput):
        parse_if_match('"5", "6"')


async def test_history_records_the_token_names(client: Client) -> None:
    assert (await _put(client, canary(10, reason="try 2"))).status == 200
    back = await client.post("/v1/rollouts/iris/rollback", headers=BOB)
    assert back.status == 200 and (await back.json())["epoch"] == 3
    body = await (await client.get("/v1/rollouts/iris/history", headers=ALICE)).json()
    assert body["model"] == "iris"
    assert [(h["epoch"], h["author"], h["reason"]) for h in body["history"]] == [
        (3, "bob", "rollback to epoch 1"), (2, "alice", "try 2"), (1, "registry", "first version"),
    ]
    assert body["history"][1]["record"]["routes"][1] == {"version": "2", "weight": 10.0}
    one = await client.get("/v1/rollouts/iris/history?limit=1", headers=ALICE)
    assert len((await one.json())["history"]) == 1


@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1"])
async def test_a_bad_history_limit_is_400(client: Client, limit: str) -> None:
    response = await client.get(f"/v1/rollouts/iris/history?limit={limit}", headers=ALICE)
    assert response.status == 400
    assert (await response.json())["error"].startswith("limit:")


async def test_rollback_to_a_named_epoch_with_a_reason(client: Client) -> None:
    await _put(client, canary(10))
    await _put(client, canary(20))
    body = {"epoch": 2, "reason": "20% was too much"}
    back = await client.post("/v1/rollouts/iris/rollback", json=body, headers=BOB)
    assert back.headers["ETag"] == '"4"'
    assert (await back.json())["routes"][1]["weight"] == 10.0
    bad = await client.post("/v1/rollouts/iris/rollback", json={"epoch": "2"}, headers=BOB)
    assert bad.status == 400 and (await bad.json())["error"].startswith("epoch:")
    missing = await client.post("/v1/rollouts/iris/rollback", json={"epoch": 99}, headers=BOB)
    assert missing.status == 404


@pytest.mark.parametrize(
    ("data", "message"), [(b'{"routes": ', "body: malformed JSON"), (b"[1]", "body: must be")]
)
async def test_a_bad_body_is_400_naming_the_body(
    client: Client, control: ControlHarness, data: bytes, message: str
) -> None:
    response = await client.put("/v1/rollouts/iris", data=data, headers=ALICE)
    assert response.status == 400
    assert (await response.json())["error"].startswith(message)
    assert await control.saved_epoch() == 1


async def test_an_invalid_field_is_400_and_an_unknown_model_404(client: Client) -> None:
    response = await _put(client, {"routes": [{"version": "1", "weight": 90}]})
    assert await response.json() == {"error": "routes: weights must sum to 100 (got 90)"}
    assert response.status == 400
    missing = await client.get("/v1/rollouts/nope", headers=ALICE)
    assert missing.status == 404
    assert await missing.json() == {"error": "model 'nope' not found"}


async def test_models_are_listed_as_the_registry_lists_them(
    client: Client, control: ControlHarness
) -> None:
    listing = await (await client.get("/v1/models", headers=ALICE)).json()
    expected = await control.registry.registry.list_models()
    assert listing == {"models": [m.to_json() for m in expected]}
    detail = await (await client.get("/v1/models/iris", headers=ALICE)).json()
    assert detail == (await control.registry.registry.get_model("iris")).to_json()


class BrokenStore(RolloutStore):
    async def get(self, model: str) -> RolloutState:
        raise RuntimeError("connection string postgresql://secret@db")


async def test_an_unexpected_error_is_500_without_details(control: ControlHarness) -> None:
    store = BrokenStore(control.registry.pool, control.registry.etcd, etcd_prefix="/x/")
    app = create_app(store, TOKENS, tenants=control.tenants)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/v1/rollouts/iris", headers=ALICE)
        assert response.status == 500
        assert await response.json() == {"error": "internal error"}


def test_openapi_documents_every_route(control_app_routes: list[tuple[str, str]]) -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert set(control_app_routes) == documented


@pytest.fixture
def control_app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app registers (HEAD comes with GET)."""
    app = create_app(RolloutStore(None, None, etcd_prefix="/x/"), TOKENS,
                     tenants=TenantStore(None, None, etcd_prefix="/x/"))
    return [
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    ]


async def test_a_get_edit_put_round_trip_is_conditional_on_the_epoch_read(client: Client) -> None:
    record = await (await client.get("/v1/rollouts/iris", headers=ALICE)).json()
    edited = {**record, **canary(30)}
    assert (await _put(client, edited)).status == 200
    again = await _put(client, edited)  # the same edit, from the same (now stale) read
    assert again.status == 412 and (await again.json())["epoch"] == 2
    wrong = await _put(client, {**edited, "model": "other", "epoch": 2})
    assert wrong.status == 400 and (await wrong.json())["error"].startswith("model:")
