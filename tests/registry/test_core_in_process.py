"""The registry core over in-process stores: what an etcd outage between the two writes does."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.mesh.domain.errors import Unavailable
from services.mesh.domain.types import Rollout
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry
from tests.registry.fakes import MemoryStore
from tests.registry.harness import SIGNATURE, chunks_of


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def registry(store: MemoryStore, tmp_path: Path) -> Registry:
    return Registry(store, ArtifactStore(tmp_path), public_url="http://registry.test/")


async def _register_during_an_outage(registry: Registry, store: MemoryStore) -> str:
    sha = (await registry.put_artifact(chunks_of(b"weights"))).sha256
    store.etcd_down = True
    with pytest.raises(Unavailable):
        await registry.register_version("iris", "1", artifact_sha256=sha, signature=SIGNATURE)
    store.etcd_down = False
    return sha


async def test_an_etcd_outage_keeps_the_saved_version_and_a_retry_publishes_it(
    registry: Registry, store: MemoryStore
) -> None:
    sha = await _register_during_an_outage(registry, store)
    assert [v.version for v in (await registry.get_model("iris")).versions] == ["1"]
    assert store.published == {}
    again = await registry.register_version("iris", "1", artifact_sha256=sha, signature=SIGNATURE)
    assert not again.created
    assert store.published == {
        "models/iris/1": again.value.to_json(),
        "rollouts/iris": Rollout.stable("iris", "1").to_json(),
    }
    assert again.value.artifact_uri == f"http://registry.test/v1/artifacts/{sha}"


async def test_reconcile_publishes_what_an_outage_left_unpublished(
    registry: Registry, store: MemoryStore
) -> None:
    await _register_during_an_outage(registry, store)
    assert await registry.reconcile() == 2
    assert store.published == store.saved
    assert await registry.reconcile() == 0


async def test_reconcile_during_an_outage_raises_unavailable(
    registry: Registry, store: MemoryStore
) -> None:
    await _register_during_an_outage(registry, store)
    store.etcd_down = True
    with pytest.raises(Unavailable):
        await registry.reconcile()
