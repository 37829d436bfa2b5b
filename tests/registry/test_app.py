from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.registry.app import create_app
from tests.credentials import AUTH, CREDENTIAL
from tests.registry.harness import SIGNATURE, RegistryHarness

Client = TestClient[web.Request, web.Application]
ARTIFACT = b"\x00model weights\xff" * 50_000  # ~800 KiB: several upload chunks


@pytest.fixture
async def client(harness: RegistryHarness) -> AsyncIterator[Client]:
    app = create_app(harness.registry, credential=CREDENTIAL)
    async with TestClient(TestServer(app), headers=AUTH) as client:
        yield client


async def test_upload_register_and_read_back(client: Client) -> None:
    sha = hashlib.sha256(ARTIFACT).hexdigest()
    upload = await client.put(
        "/v1/artifacts", data=ARTIFACT, headers={"X-Infermesh-Sha256": sha}
    )
    assert upload.status == 201
    assert await upload.json() == {
        "sha256": sha, "size": len(ARTIFACT), "uri": f"http://registry.test/v1/artifacts/{sha}"
    }
    body = {"artifact_sha256": sha, "signature": SIGNATURE, "batching": {"max_batch_size": 4}}
    created = await client.put("/v1/models/iris/versions/1", json=body)
    assert created.status == 201
    record = await created.json()
    assert record["sha256"] == sha and record["batching"]["max_batch_size"] == 4
    again = await client.put("/v1/models/iris/versions/1", json=body)
    assert again.status == 200 and await again.json() == record

    model = await (await client.get("/v1/models/iris")).json()
    assert [v["version"] for v in model["versions"]] == ["1"]
    assert model["rollout"]["routes"] == [{"version": "1", "weight": 100.0}]
    listing = await (await client.get("/v1/models")).json()
    assert [(m["name"], m["serving"]) for m in listing["models"]] == [("iris", "1")]
    download = await client.get(f"/v1/artifacts/{sha}")
    assert download.status == 200 and await download.read() == ARTIFACT


async def test_create_model_is_201_then_200(client: Client) -> None:
    first = await client.post("/v1/models", json={"name": "iris", "description": "flowers"})
    assert first.status == 201 and (await first.json())["description"] == "flowers"
    assert (await client.post("/v1/models", json={"name": "iris"})).status == 200


async def test_malformed_json_is_400_with_a_message(client: Client) -> None:
    response = await client.post(
        "/v1/models", data=b'{"name": ', headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert (await response.json())["error"].startswith("body: malformed JSON")
    missing = await client.put("/v1/models/iris/versions/1", json={"signature": SIGNATURE})
    assert missing.status == 400
    assert await missing.json() == {"error": "missing field 'artifact_sha256'"}


async def test_unknown_things_are_404(client: Client) -> None:
    response = await client.get("/v1/models/nope")
    assert response.status == 404
    assert await response.json() == {"error": "model 'nope' not found"}
    artifact = await client.get(f"/v1/artifacts/{'0' * 64}")
    assert artifact.status == 404
    assert (await client.get("/v1/nothing-here")).status == 404


async def test_conflict_is_409_and_mismatch_is_400(client: Client) -> None:
    shas = []
    for data in (b"one", b"two"):
        shas.append((await (await client.put("/v1/artifacts", data=data)).json())["sha256"])
    url = "/v1/models/iris/versions/1"
    first = await client.put(url, json={"artifact_sha256": shas[0], "signature": SIGNATURE})
    assert first.status == 201
    conflict = await client.put(url, json={"artifact_sha256": shas[1], "signature": SIGNATURE})
    assert conflict.status == 409
    assert "already exists with a different" in (await conflict.json())["error"]
    mismatch = await client.put(
        "/v1/artifacts", data=b"three", headers={"X-Infermesh-Sha256": shas[0]}
    )
    assert mismatch.status == 400 and "mismatch" in (await mismatch.json())["error"]


async def test_health_and_metrics(client: Client) -> None:
    assert (await client.get("/v2/health/live")).status == 200
    await client.get("/v1/models/nope")
    metrics = await (await client.get("/metrics")).text()
    sample = 'method="GET",route="/v1/models/{name}",status="404"} 1.0'
    assert f"infermesh_registry_http_requests_total{{{sample}" in metrics


async def test_a_bad_prediction_log_policy_is_400_naming_the_field(client: Client) -> None:
    sha = (await (await client.put("/v1/artifacts", data=b"one")).json())["sha256"]
    url = "/v1/models/iris/versions/1"
    body = {"artifact_sha256": sha, "signature": SIGNATURE, "prediction_log": "everything"}
    refused = await client.put(url, json=body)
    assert refused.status == 400
    assert (await refused.json())["error"].startswith("prediction_log: must be one of")
    created = await client.put(url, json={**body, "prediction_log": "none"})
    assert created.status == 201 and (await created.json())["prediction_log"] == "none"
