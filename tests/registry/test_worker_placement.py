"""`worker` on a version: `shared` (its model's workers, the default) or `dedicated` (workers of
its own), checked at registration and on the record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.hops import resident_in_record
from services.mesh.domain.types import ModelVersion, Signature
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry, VersionConflict
from services.registry.validation import parse_worker_placement
from tests.registry.fakes import MemoryStore
from tests.registry.harness import SIGNATURE as HARNESS_SIGNATURE
from tests.registry.harness import chunks_of
from tests.registry.test_cpu_fallback import SIGNATURE


@pytest.mark.parametrize("raw", ["own", "", None, True, ["dedicated"]])
def test_worker_must_be_shared_or_dedicated(raw: Any) -> None:
    with pytest.raises(InvalidInput, match="^worker: must be one of shared, dedicated"):
        parse_worker_placement(raw)


def test_worker_round_trips_through_the_record_and_defaults_to_shared() -> None:
    version = ModelVersion("m", "1", Signature.from_json(SIGNATURE), "uri", "0" * 64,
                           worker=parse_worker_placement("dedicated"))
    assert ModelVersion.from_json(version.to_json()).worker == "dedicated"
    shared = ModelVersion("m", "1", Signature.from_json(SIGNATURE), "uri", "0" * 64)
    assert "worker" not in shared.to_json(), "records of shared versions stay as they were"
    assert ModelVersion.from_json(shared.to_json()).worker == "shared"
    with pytest.raises(InvalidInput, match="^worker"):
        ModelVersion.from_json({**version.to_json(), "worker": "own"})


def test_a_worker_record_without_a_resident_list_counts_what_it_serves_as_loaded() -> None:
    record = {"models": ["mlp/1", "mlp/2"], "resident": ["mlp/1"]}
    assert resident_in_record(record, "mlp", "1")
    assert not resident_in_record(record, "mlp", "2")
    assert resident_in_record({"models": ["mlp/2"]}, "mlp", "2")


async def test_a_dedicated_version_is_published_as_such_and_cannot_be_re_registered_shared(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    registry = Registry(store, ArtifactStore(tmp_path), public_url="http://registry.test/")
    sha = (await registry.put_artifact(chunks_of(b"weights"))).sha256
    await registry.register_version("iris", "1", artifact_sha256=sha, signature=HARNESS_SIGNATURE,
                                    worker="dedicated")
    assert store.published["models/iris/1"]["worker"] == "dedicated"
    with pytest.raises(VersionConflict):
        await registry.register_version("iris", "1", artifact_sha256=sha,
                                        signature=HARNESS_SIGNATURE)
    with pytest.raises(InvalidInput, match="^worker"):
        await registry.register_version("iris", "2", artifact_sha256=sha,
                                        signature=HARNESS_SIGNATURE, worker="own")
