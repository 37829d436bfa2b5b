from __future__ import annotations

from pathlib import Path

import orjson

from services.mesh.domain.types import Rollout
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry
from services.registry.store import PostgresEtcdStore
from tests.mesh.test_publishing import RacingEtcd
from tests.registry.harness import SIGNATURE, RegistryHarness, chunks_of


async def test_reconcile_never_overwrites_a_rollout_published_meanwhile(
    harness: RegistryHarness, tmp_path: Path
) -> None:
    info = await harness.registry.put_artifact(chunks_of(b"weights"))
    await harness.registry.register_version(
        "iris", "1", artifact_sha256=info.sha256, signature=SIGNATURE
    )
    key = (harness.prefix + "rollouts/iris").encode()
    await harness.etcd.delete(key)
    # The control API publishes epoch 5 between this reconcile's read and its write.
    newer = Rollout.stable("iris", "1", epoch=5).to_json()
    racing = RacingEtcd(harness.etcd, key, competitor=newer)
    registry = Registry(
        PostgresEtcdStore(harness.pool, racing, etcd_prefix=harness.prefix),
        ArtifactStore(tmp_path / "artifacts"), public_url="http://registry.test",
    )
    assert await registry.reconcile() == 0
    assert orjson.loads((await harness.etcd.get(key)).value) == newer
