"""The registry is an internal surface: every route but health and metrics needs the mesh
credential."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.registry.app import create_app
from tests.credentials import AUTH, CREDENTIAL
from tests.registry.harness import RegistryHarness

Client = TestClient[Any, Any]
ARTIFACT = b"not really torchscript"


@pytest.fixture
async def anonymous(harness: RegistryHarness) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(harness.registry, credential=CREDENTIAL))) as c:
        yield c


async def test_list_register_and_upload_are_refused_without_the_credential(
    anonymous: Client, harness: RegistryHarness,
) -> None:
    sha = hashlib.sha256(ARTIFACT).hexdigest()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        calls = [
            anonymous.get("/v1/models", headers=headers),
            anonymous.post("/v1/models", json={"name": "iris"}, headers=headers),
            anonymous.put("/v1/models/iris/versions/1", json={}, headers=headers),
            anonymous.put("/v1/artifacts", data=ARTIFACT, headers=headers),
            anonymous.get(f"/v1/artifacts/{sha}", headers=headers),
        ]
        for call in calls:
            response = await call
            assert response.status == 401
            assert "Authorization: Bearer" in (await response.json())["error"]
    assert await harness.registry.list_models() == []


async def test_the_credential_opens_every_route(anonymous: Client) -> None:
    created = await anonymous.post("/v1/models", json={"name": "iris"}, headers=AUTH)
    assert created.status == 201
    uploaded = await anonymous.put("/v1/artifacts", data=ARTIFACT, headers=AUTH)
    assert uploaded.status == 201
    listing = await (await anonymous.get("/v1/models", headers=AUTH)).json()
    assert [m["name"] for m in listing["models"]] == ["iris"]


async def test_health_and_metrics_stay_open(anonymous: Client) -> None:
    assert (await anonymous.get("/metrics")).status == 200
    assert (await anonymous.get("/v2/health/live")).status == 200
