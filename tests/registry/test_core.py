from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest
from blockbuster import blockbuster_ctx

from services.mesh.domain.errors import InvalidInput, NotFound
from services.mesh.domain.types import ModelVersion, Rollout
from services.registry.core import VersionConflict
from tests.registry.harness import SIGNATURE, RegistryHarness, chunks_of

ARTIFACT = b"torchscript bytes " * 1000


async def _upload(harness: RegistryHarness, data: bytes = ARTIFACT) -> str:
    info = await harness.registry.put_artifact(chunks_of(data))
    return info.sha256


async def test_register_writes_postgres_then_publishes_version_and_rollout(
    harness: RegistryHarness,
) -> None:
    sha = await _upload(harness)
    stored = await harness.registry.register_version(
        "iris", "1", artifact_sha256=sha, signature=SIGNATURE, batching={"max_batch_size": 8}
    )
    assert stored.created
    row = await harness.pool.fetchrow("SELECT record, sha256 FROM model_versions")
    assert row["sha256"] == sha
    assert ModelVersion.from_json(row["record"]) == stored.value
    published = await harness.etcd_json("models/iris/1")
    assert published == stored.value.to_json()
    assert published["artifact_uri"] == f"http://registry.test/v1/artifacts/{sha}"
    assert published["batching"]["max_batch_size"] == 8
    assert published["batching"]["max_queue_delay_ms"] == 2.0
    assert await harness.etcd_json("rollouts/iris") == Rollout.stable("iris", "1").to_json()
    history = await harness.pool.fetch("SELECT author, reason, epoch FROM rollout_history")
    assert [tuple(r) for r in history] == [("registry", "first version", 1)]


async def test_second_version_keeps_the_first_rollout(harness: RegistryHarness) -> None:
    sha = await _upload(harness)
    await harness.registry.register_version("iris", "1", artifact_sha256=sha, signature=SIGNATURE)
    await harness.registry.register_version("iris", "2", artifact_sha256=sha, signature=SIGNATURE)
    assert (await harness.etcd_json("rollouts/iris"))["routes"] == [
        {"version": "1", "weight": 100.0}
    ]
    detail = await harness.registry.get_model("iris")
    assert [v.version for v in detail.versions] == ["1", "2"]
    assert detail.summary.serving == "1" and detail.summary.latest == "2"


async def test_identical_reregister_is_a_no_op(harness: RegistryHarness) -> None:
    sha = await _upload(harness)
    first = await harness.registry.register_version(
        "iris", "1", artifact_sha256=sha, signature=SIGNATURE
    )
    again = await harness.registry.register_version(
        "iris", "1", artifact_sha256=sha, signature=SIGNATURE
    )
    assert not again.created and again.value == first.value
    assert await harness.pool.fetchval("SELECT count(*) FROM rollout_history") == 1


async def test_conflicting_reregister_is_rejected(harness: RegistryHarness) -> None:
    sha = await _upload(harness)
    other = await _upload(harness, b"another model")
    await harness.registry.register_version("iris", "1", artifact_sha256=sha, signature=SIGNATURE)
    with pytest.raises(VersionConflict, match="version 1 of model iris already exists"):
        await harness.registry.register_version(
            "iris", "1", artifact_sha256=other, signature=SIGNATURE
        )
    assert (await harness.etcd_json("models/iris/1"))["sha256"] == sha


@pytest.mark.parametrize(
    ("signature", "field"),
    [
        ({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1]}],
          "outputs": SIGNATURE["outputs"]}, "unknown datatype 'FP99'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": "1,2"}],
          "outputs": SIGNATURE["outputs"]}, "'shape'"),
        ({"inputs": SIGNATURE["inputs"]}, "at least one input and one output"),
        ({"inputs": ["x"], "outputs": SIGNATURE["outputs"]}, "'inputs' must be a list"),
        ("x:FP32", "signature: must be an object"),
    ],
)
async def test_bad_signature_names_the_field(
    harness: RegistryHarness, signature: object, field: str
) -> None:
    sha = await _upload(harness)
    with pytest.raises(InvalidInput, match=field):
        await harness.registry.register_version(
            "iris", "1", artifact_sha256=sha, signature=signature  # type: ignore[arg-type]
        )
    assert await harness.registry.list_models() == []


async def test_unknown_artifact_and_bad_names_are_rejected(harness: RegistryHarness) -> None:
    with pytest.raises(InvalidInput, match="artifact_sha256: no artifact"):
        await harness.registry.register_version(
            "iris", "1", artifact_sha256="0" * 64, signature=SIGNATURE
        )
    with pytest.raises(InvalidInput, match="^name:"):
        await harness.registry.create_model("../etc")
    with pytest.raises(InvalidInput, match="^version:"):
        await harness.registry.register_version(
            "iris", "v 1", artifact_sha256="0" * 64, signature=SIGNATURE
        )
    with pytest.raises(InvalidInput, match="batching: 'max_batch_size'"):
        await harness.registry.register_version(
            "iris", "1", artifact_sha256=await _upload(harness), signature=SIGNATURE,
            batching={"max_batch_size": 0},
        )


async def test_create_model_is_idempotent(harness: RegistryHarness) -> None:
    assert (await harness.registry.create_model("iris", "flowers")).created
    again = await harness.registry.create_model("iris", "ignored")
    assert not again.created and again.value.description == "flowers"
    assert [m.name for m in await harness.registry.list_models()] == ["iris"]
    with pytest.raises(NotFound):
        await harness.registry.get_model("nope")


async def test_artifact_is_content_addressed_and_streamed_off_the_loop(
    harness: RegistryHarness,
) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB in 1000-byte chunks
    sha = hashlib.sha256(data).hexdigest()
    with blockbuster_ctx(["services.registry"]):
        info = await harness.registry.put_artifact(chunks_of(data), expected_sha256=sha)
    assert (info.sha256, info.size) == (sha, len(data))
    path = await harness.registry.artifact_path(sha)
    assert path.parts[-2:] == (sha[:2], sha) and path.read_bytes() == data


async def test_sha_mismatch_is_rejected_and_leaves_no_file(
    harness: RegistryHarness, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="sha256 mismatch"):
        await harness.registry.put_artifact(chunks_of(ARTIFACT), expected_sha256="a" * 64)
    assert [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] == []
    with pytest.raises(NotFound):
        await harness.registry.artifact_path(hashlib.sha256(ARTIFACT).hexdigest())


async def test_reconcile_republishes_what_etcd_lost(harness: RegistryHarness) -> None:
    sha = await _upload(harness)
    stored = await harness.registry.register_version(
        "iris", "1", artifact_sha256=sha, signature=SIGNATURE
    )
    assert await harness.registry.reconcile() == 0
    await harness.etcd.delete_prefix(harness.prefix.encode())
    assert await harness.registry.reconcile() == 2
    assert await harness.etcd_json("models/iris/1") == stored.value.to_json()
    assert await harness.etcd_json("rollouts/iris") == Rollout.stable("iris", "1").to_json()


async def test_reconcile_leaves_a_newer_rollout_alone(harness: RegistryHarness) -> None:
    sha = await _upload(harness)
    await harness.registry.register_version("iris", "1", artifact_sha256=sha, signature=SIGNATURE)
    newer = Rollout.stable("iris", "1", epoch=5).to_json()
    await harness.etcd.put((harness.prefix + "rollouts/iris").encode(), orjson.dumps(newer))
    assert await harness.registry.reconcile() == 0
    assert await harness.etcd_json("rollouts/iris") == newer


async def test_the_prediction_log_policy_is_stored_and_published(
    harness: RegistryHarness,
) -> None:
    sha = await _upload(harness)
    stored = await harness.registry.register_version(
        "iris", "1", artifact_sha256=sha, signature=SIGNATURE, prediction_log="full"
    )
    assert stored.value.prediction_log == "full"
    assert (await harness.etcd_json("models/iris/1"))["prediction_log"] == "full"
    default = await harness.registry.register_version(
        "iris", "2", artifact_sha256=sha, signature=SIGNATURE
    )
    assert default.value.prediction_log == "digest"
    with pytest.raises(InvalidInput, match="^prediction_log: must be one of full, digest, none"):
        await harness.registry.register_version(
            "iris", "3", artifact_sha256=sha, signature=SIGNATURE, prediction_log="all"
        )


def test_a_record_without_a_prediction_log_policy_reads_as_digest() -> None:
    record = ModelVersion.from_json({"model": "m", "version": "1", "signature": SIGNATURE})
    assert record.prediction_log == "digest"
    with pytest.raises(InvalidInput, match="^prediction_log:"):
        ModelVersion.from_json({**record.to_json(), "prediction_log": ["full"]})
