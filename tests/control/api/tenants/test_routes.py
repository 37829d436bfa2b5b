"""Tenants, keys and limits through the control API's REST adapter (aiohttp's test client)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control.api.app import create_app
from control.api.openapi import openapi_document
from services.mesh.domain.tenancy import ApiKeyRecord, split_key
from tests.control.api.conftest import ControlHarness

Client = TestClient[web.Request, web.Application]
ALICE = {"Authorization": "Bearer alice-secret"}
ROUTES = [
    ("POST", "/v1/tenants"), ("GET", "/v1/tenants"), ("GET", "/v1/tenants/acme"),
    ("PATCH", "/v1/tenants/acme"), ("DELETE", "/v1/tenants/acme"),
    ("POST", "/v1/tenants/acme/keys"), ("GET", "/v1/tenants/acme/keys"),
    ("DELETE", "/v1/keys/0123456789ab"), ("PUT", "/v1/models/iris/limits"),
    ("GET", "/v1/models/iris/limits"), ("DELETE", "/v1/models/iris/limits"),
]


@pytest.fixture
async def client(control: ControlHarness) -> AsyncIterator[Client]:
    app = create_app(control.store, {"alice-secret": "alice"}, tenants=control.tenants)
    async with TestClient(TestServer(app)) as client:
        yield client


async def call(client: Client, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    response = await client.request(method, path, json=body, headers=ALICE)
    return response.status, await response.json()


async def test_every_tenancy_route_needs_a_token(client: Client) -> None:
    for method, path in ROUTES:
        response = await client.request(method, path, json={"name": "acme", "rate": 1})
        assert response.status == 401, (method, path)
    assert (await call(client, "GET", "/v1/tenants"))[1] == {"tenants": []}


async def test_tenant_create_read_update_disable(client: Client, control: ControlHarness) -> None:
    status, created = await call(client, "POST", "/v1/tenants", {"name": "acme", "rate": 100})
    assert status == 201
    assert created == {"name": "acme", "rate": 100.0, "burst": 100, "max_concurrency": 64,
                       "allowed_models": None, "priority_class": "realtime", "weight": 1.0,
                       "disabled": False}
    status, shown = await call(client, "GET", "/v1/tenants/acme")
    assert status == 200 and shown["created_at"] and shown == {**created, **shown}
    status, patched = await call(client, "PATCH", "/v1/tenants/acme", {"burst": 20})
    assert status == 200 and patched == {**created, "burst": 20}
    status, disabled = await call(client, "DELETE", "/v1/tenants/acme")
    assert status == 200 and disabled == {**patched, "disabled": True}
    assert await control.registry.etcd_json("tenants/acme") == disabled
    listed = (await call(client, "GET", "/v1/tenants"))[1]["tenants"]
    assert [(t["name"], t["disabled"]) for t in listed] == [("acme", True)]


async def test_tenant_errors_map_to_400_404_and_409(client: Client) -> None:
    await call(client, "POST", "/v1/tenants", {"name": "acme", "rate": 1})
    status, body = await call(client, "POST", "/v1/tenants", {"name": "acme", "rate": 1})
    assert status == 409 and body["error"].startswith("name: tenant 'acme' exists")
    status, body = await call(client, "POST", "/v1/tenants", {"name": "b", "rate": 1, "x": 1})
    assert status == 400 and body["error"].startswith("x: unknown field")
    status, body = await call(client, "PATCH", "/v1/tenants/acme", {"weight": 0})
    assert status == 400 and body["error"].startswith("weight: ")
    assert (await call(client, "GET", "/v1/tenants/nope"))[0] == 404
    assert (await call(client, "PATCH", "/v1/tenants/nope", {"rate": 1}))[0] == 404
    response = await client.post("/v1/tenants", data=b"[1]", headers=ALICE)
    assert response.status == 400


async def test_a_key_is_shown_once_and_never_its_hash(
    client: Client, control: ControlHarness
) -> None:
    await call(client, "POST", "/v1/tenants", {"name": "acme", "rate": 1})
    response = await client.post("/v1/tenants/acme/keys", json={"note": "ci"}, headers=ALICE)
    assert response.status == 201 and response.headers["Cache-Control"] == "no-store"
    issued = await response.json()
    key_id, secret = split_key(issued["key"])
    assert issued["key_id"] == key_id and issued["prefix"] == f"imk_{key_id}"
    assert (issued["tenant"], issued["note"], issued["created_by"]) == ("acme", "ci", "alice")
    assert issued["created_at"] and "hash" not in issued and "salt" not in issued
    record = ApiKeyRecord.from_json(await control.registry.etcd_json(f"apikeys/{key_id}"))
    assert record.matches(secret)
    bare = await client.post("/v1/tenants/acme/keys", headers=ALICE)  # no body: no note
    assert bare.status == 201 and (await bare.json())["note"] == ""

    listing = await client.get("/v1/tenants/acme/keys", headers=ALICE)
    text = await listing.text()
    for secret_part in (secret, record.hash, record.salt, '"hash"', '"salt"', '"key"'):
        assert secret_part not in text
    assert [k["key_id"] for k in (await listing.json())["keys"]][0] == key_id


async def test_revoke_a_key(client: Client, control: ControlHarness) -> None:
    await call(client, "POST", "/v1/tenants", {"name": "acme", "rate": 1})
    issued = (await call(client, "POST", "/v1/tenants/acme/keys", {}))[1]
    status, revoked = await call(client, "DELETE", f"/v1/keys/{issued['key_id']}")
    assert status == 200 and revoked["key_id"] == issued["key_id"] and revoked["revoked_at"]
    assert "hash" not in revoked
    assert await control.registry.etcd_json(f"apikeys/{issued['key_id']}") is None
    assert await call(client, "DELETE", f"/v1/keys/{issued['key_id']}") == (200, revoked)
    assert (await call(client, "DELETE", "/v1/keys/0123456789ab"))[0] == 404
    status, body = await call(client, "POST", "/v1/tenants/acme/keys", {"label": "x"})
    assert status == 400 and body["error"].startswith("label: unknown field")


async def test_model_limits(client: Client) -> None:
    path = "/v1/models/iris/limits"
    assert (await call(client, "GET", path))[0] == 404
    assert await call(client, "PUT", path, {"max_concurrency": 8}) == (
        200, {"model": "iris", "max_concurrency": 8})
    assert await call(client, "GET", path) == (200, {"model": "iris", "max_concurrency": 8})
    status, body = await call(client, "PUT", path, {"max_concurrency": 0})
    assert status == 400 and body["error"].startswith("max_concurrency: ")
    assert (await call(client, "PUT", "/v1/models/wine/limits", {"max_concurrency": 1}))[0] == 404
    assert await call(client, "DELETE", path) == (200, {"model": "iris", "max_concurrency": None})
    assert (await call(client, "GET", path))[0] == 404


def test_openapi_documents_the_tenancy_routes() -> None:
    document = openapi_document()
    paths = document["paths"]
    for method, path in ROUTES:
        template = (path.replace("acme", "{tenant}").replace("0123456789ab", "{key_id}")
                    .replace("iris", "{model}"))
        assert method.lower() in paths[template], (method, template)
    issue = paths["/v1/tenants/{tenant}/keys"]["post"]["responses"]["201"]
    assert "Cache-Control" in issue["headers"]
    schemas = document["components"]["schemas"]
    assert set(_refs(document)) <= {f"#/components/schemas/{name}" for name in schemas}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []
