"""A version's `autoscaling` block: accepted at registration, changed at runtime
(PATCH /v1/models/{m}/versions/{v}/autoscaling), checked by the autoscaler's own parser and
published in the `models/` record with the `replicas` bounds the launcher's fleet reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.mesh.domain.autoscaling import parse_spec
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import ModelVersion
from services.registry.app import create_app
from tests.credentials import AUTH, CREDENTIAL
from tests.registry.harness import SIGNATURE, RegistryHarness, chunks_of

Client = TestClient[web.Request, web.Application]


async def _register(harness: RegistryHarness, autoscaling: Any = None) -> ModelVersion:
    sha = (await harness.registry.put_artifact(chunks_of(b"weights"))).sha256
    stored = await harness.registry.register_version(
        "iris", "1", artifact_sha256=sha, signature=SIGNATURE, autoscaling=autoscaling
    )
    return stored.value


@pytest.fixture
async def client(harness: RegistryHarness) -> AsyncIterator[Client]:
    app = create_app(harness.registry, credential=CREDENTIAL)
    async with TestClient(TestServer(app), headers=AUTH) as client:
        yield client


async def test_registered_and_changed_blocks_are_published_for_the_autoscaler(
    harness: RegistryHarness,
) -> None:
    plain = await _register(harness)
    assert "autoscaling" not in plain.to_json()  # not autoscaled: the fleet stays fixed
    after = await harness.registry.change_autoscaling(
        "iris", "1", {"max_replicas": 3, "panic_window": 2, "stable_window": 6}
    )
    published = await harness.etcd_json("models/iris/1")
    assert published == after.to_json()
    assert published["replicas"] == {"min": 1, "max": 3}
    spec = parse_spec(published)  # what the autoscaler reads back
    assert (spec.min_replicas, spec.max_replicas, spec.panic_window) == (1, 3, 2.0)
    # A second change merges; null puts a field back to its default.
    again = await harness.registry.change_autoscaling(
        "iris", "1", {"min_replicas": 0, "scale_to_zero": True, "panic_window": None}
    )
    assert again.autoscaling == {"min_replicas": 0, "max_replicas": 3, "stable_window": 6,
                                 "scale_to_zero": True}
    saved = await harness.pool.fetchval("SELECT record FROM model_versions")
    assert ModelVersion.from_json(saved) == again


async def test_registration_accepts_a_block_and_a_rerun_keeps_a_change(
    harness: RegistryHarness,
) -> None:
    first = await _register(harness, {"max_replicas": 2})
    assert first.to_json()["replicas"] == {"min": 1, "max": 2}
    changed = await harness.registry.change_autoscaling("iris", "1", {"max_replicas": 5})
    again = await _register(harness, {"max_replicas": 2})
    assert not (await harness.registry.register_version(
        "iris", "1", artifact_sha256=first.sha256, signature=SIGNATURE)).created
    assert again == changed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"min_replicas": 0}, "replicas.min must be >= 1 unless autoscaling.scale_to_zero"),
        ({"panic_window": 0}, "autoscaling.panic_window must be a number > 0"),
        ({"target_wait": "fast"}, "autoscaling.target_wait must be a number"),
        ({"max_replicas": 9, "min_replicas": 10}, "replicas.min must be <= replicas.max"),
        ({"panic": 2}, "autoscaling.panic is not a known field"),
        ({}, "autoscaling: must be an object naming at least one field"),
    ],
)
async def test_a_bad_change_names_the_field_and_changes_nothing(
    harness: RegistryHarness, change: dict[str, Any], message: str
) -> None:
    before = await _register(harness, {"max_replicas": 2})
    with pytest.raises(InvalidInput, match=message):
        await harness.registry.change_autoscaling("iris", "1", change)
    assert await harness.etcd_json("models/iris/1") == before.to_json()


async def test_patch_over_http(harness: RegistryHarness, client: Client) -> None:
    await _register(harness)
    url = "/v1/models/iris/versions/1/autoscaling"
    changed = await client.patch(url, json={"max_replicas": 4, "target_wait": 0.1})
    assert changed.status == 200
    record = await changed.json()
    assert record["autoscaling"]["target_wait"] == 0.1
    assert await harness.etcd_json("models/iris/1") == record
    refused = await client.patch(url, json={"max_step": 0})
    assert refused.status == 400
    assert (await refused.json())["error"].startswith("autoscaling.max_step must be an integer")
    bad = await client.put("/v1/models/iris/versions/2", json={
        "artifact_sha256": record["sha256"], "signature": SIGNATURE, "autoscaling": [1]})
    assert bad.status == 400
    assert (await bad.json())["error"] == "autoscaling: must be an object"
