"""Changing a version's queue policy at runtime: PATCH /v1/models/{m}/versions/{v}/batching.

The partial object is merged over the saved policy, validated as a whole, saved in Postgres and
republished at `models/{m}/{v}` (the record the data plane watches); the artifact, signature and
other fields stay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.mesh.domain.errors import InvalidInput, NotFound
from services.mesh.domain.types import ModelVersion
from services.registry.app import create_app
from tests.credentials import AUTH, CREDENTIAL
from tests.registry.harness import SIGNATURE, RegistryHarness, chunks_of

Client = TestClient[web.Request, web.Application]


async def _register(harness: RegistryHarness, **batching: Any) -> ModelVersion:
    sha = (await harness.registry.put_artifact(chunks_of(b"weights"))).sha256
    stored = await harness.registry.register_version(
        "iris", "1", artifact_sha256=sha, signature=SIGNATURE, batching=batching or None
    )
    return stored.value


@pytest.fixture
async def client(harness: RegistryHarness) -> AsyncIterator[Client]:
    app = create_app(harness.registry, credential=CREDENTIAL)
    async with TestClient(TestServer(app), headers=AUTH) as client:
        yield client


async def test_a_change_is_merged_saved_and_republished(harness: RegistryHarness) -> None:
    before = await _register(harness, max_batch_size=16, preferred_batch_sizes=[8, 16])
    after = await harness.registry.change_batching(
        "iris", "1", {"max_batch_size": 8, "preferred_batch_sizes": [4, 8], "admission": "off"}
    )
    assert after.batching.to_json() == {
        **before.batching.to_json(),
        "max_batch_size": 8, "preferred_batch_sizes": [4, 8], "admission": "off",
    }
    assert (after.signature, after.sha256, after.artifact_uri) == (
        before.signature, before.sha256, before.artifact_uri
    )
    assert await harness.etcd_json("models/iris/1") == after.to_json()
    saved = await harness.pool.fetchval("SELECT record FROM model_versions")
    assert ModelVersion.from_json(saved) == after
    # A second partial change keeps the first one's fields.
    again = await harness.registry.change_batching("iris", "1", {"default_timeout_ms": 250})
    assert again.batching.max_batch_size == 8 and again.batching.default_timeout_ms == 250.0


async def test_reregistering_after_a_change_is_a_no_op_that_keeps_it(
    harness: RegistryHarness,
) -> None:
    # `infermesh up` registers its demo models on every start: that must not undo a change
    # (nor fail as a conflicting version).
    first = await _register(harness)
    changed = await harness.registry.change_batching("iris", "1", {"max_batch_size": 4})
    again = await harness.registry.register_version(
        "iris", "1", artifact_sha256=first.sha256, signature=SIGNATURE
    )
    assert not again.created and again.value == changed
    assert (await harness.etcd_json("models/iris/1"))["batching"]["max_batch_size"] == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_batch_size": 0}, "batching: 'max_batch_size' must be >= 1"),
        ({"max_batch_size": "8"}, "batching: 'max_batch_size' must be an integer"),
        ({"max_batch_size": 4}, "'preferred_batch_sizes' must lie within 1..max_batch_size"),
        ({"preferred_batch_sizes": [2, "x"]}, "'preferred_batch_sizes' must be a list"),
        ({"admission": "maybe"}, "'admission' must be one of predictive, strict, off"),
        ({"max_queue_delay_ms": -1}, "'max_queue_delay_ms' must be within"),
        ({"edge_inflight": 0}, "batching: 'edge_inflight' must be >= 1"),
        ({"edge_inflight": "64"}, "batching: 'edge_inflight' must be an integer or null"),
        ({"max_batch": 4}, "batching: unknown field 'max_batch'"),
        ({}, "batching: name at least one field"),
    ],
)
async def test_a_bad_change_names_the_field_and_changes_nothing(
    harness: RegistryHarness, change: dict[str, Any], message: str
) -> None:
    before = await _register(harness, max_batch_size=16, preferred_batch_sizes=[8, 16])
    with pytest.raises(InvalidInput, match=message):
        await harness.registry.change_batching("iris", "1", change)
    assert await harness.etcd_json("models/iris/1") == before.to_json()
    assert (await harness.registry.get_model("iris")).versions == [before]


async def test_an_unknown_version_is_not_found(harness: RegistryHarness) -> None:
    await _register(harness)
    with pytest.raises(NotFound, match="unknown version '2' of model 'iris'"):
        await harness.registry.change_batching("iris", "2", {"max_batch_size": 4})


async def test_patch_over_http(harness: RegistryHarness, client: Client) -> None:
    await _register(harness)
    url = "/v1/models/iris/versions/1/batching"
    changed = await client.patch(url, json={"max_batch_size": 4, "max_queue_delay_ms": 5})
    assert changed.status == 200
    record = await changed.json()
    assert record["batching"]["max_batch_size"] == 4
    assert record["batching"]["max_queue_delay_ms"] == 5.0
    assert await harness.etcd_json("models/iris/1") == record
    refused = await client.patch(url, json={"admission": "later"})
    assert refused.status == 400
    assert (await refused.json())["error"].startswith("batching: 'admission' must be one of")
    missing = await client.patch("/v1/models/iris/versions/9/batching", json={"admission": "off"})
    assert missing.status == 404
