"""The registry core: models and immutable versions in Postgres, published to etcd.

Every write goes to Postgres first (durable, audited) and is then published to etcd, where the
data plane watches it. `reconcile()` republishes whatever etcd lacks, repairing a crash or an
etcd outage between the two writes; it runs at start and then periodically.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import aetcd
import asyncpg
import orjson

from services.mesh.domain.errors import InvalidInput, NotFound, Unavailable
from services.mesh.domain.types import ModelVersion, Rollout
from services.mesh.infra.publishing import publish_newer
from services.registry import queries, reads
from services.registry.artifacts import ArtifactInfo, ArtifactStore, check_sha256
from services.registry.reads import ModelDetail, ModelSummary
from services.registry.validation import (
    check_name,
    parse_batching,
    parse_device,
    parse_prediction_log,
    parse_signature,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class VersionConflict(InvalidInput):
    """A version exists already with different content (versions are immutable)."""


@dataclass(frozen=True, slots=True)
class Stored(Generic[T]):
    """The outcome of an idempotent write: the record, and whether this call created it."""

    value: T
    created: bool


class Registry:
    """Models, versions and artifacts; Postgres is the truth, etcd the published copy."""

    def __init__(
        self, pool: asyncpg.Pool, etcd: aetcd.Client, *, etcd_prefix: str,
        artifacts: ArtifactStore, public_url: str,
    ) -> None:
        self._pool = pool
        self._etcd = etcd
        self._prefix = etcd_prefix
        self._artifacts = artifacts
        self._public_url = public_url.rstrip("/")

    # -- models ---------------------------------------------------------------------------

    async def create_model(self, name: str, description: str = "") -> Stored[ModelSummary]:
        """Create a model (idempotent: an existing model is returned unchanged)."""
        check_name(name, field="name")
        if not isinstance(description, str):
            raise InvalidInput("description: must be a string")
        async with self._pool.acquire() as conn:
            created = await conn.fetchval(queries.INSERT_MODEL, name, description)
        return Stored(await self._summary(name), created is not None)

    async def list_models(self) -> list[ModelSummary]:
        """Every model, by name."""
        return await reads.list_models(self._pool)

    async def get_model(self, name: str) -> ModelDetail:
        """A model with its versions and rollout; NotFound if unknown."""
        return await reads.model_detail(self._pool, name)

    async def _summary(self, name: str) -> ModelSummary:
        return await reads.model_summary(self._pool, name)

    # -- artifacts ------------------------------------------------------------------------

    async def put_artifact(
        self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None
    ) -> ArtifactInfo:
        """Store a streamed artifact under its sha256; InvalidInput on a digest mismatch."""
        return await self._artifacts.put(chunks, expected_sha256=expected_sha256)

    async def artifact_path(self, sha256: str) -> Path:
        """The local file of a stored artifact; NotFound if it is not stored."""
        return await self._artifacts.path(sha256)

    def artifact_uri(self, sha256: str) -> str:
        """Where workers download the artifact from."""
        return f"{self._public_url}/v1/artifacts/{sha256}"

    # -- versions -------------------------------------------------------------------------

    async def register_version(
        self, model: str, version: str, *, artifact_sha256: str, signature: Mapping[str, Any],
        batching: Mapping[str, Any] | None = None, device: str = "auto",
        platform: str = "pytorch_torchscript", prediction_log: str = "digest",
    ) -> Stored[ModelVersion]:
        """Register an immutable version (creating the model and its first rollout if needed).

        Re-registering identical content is a no-op; different content raises VersionConflict.
        """
        record = ModelVersion(
            model=check_name(model, field="model"),
            version=check_name(version, field="version"),
            signature=parse_signature(signature),
            artifact_uri=self.artifact_uri(check_sha256(artifact_sha256, field="artifact_sha256")),
            sha256=artifact_sha256,
            batching=parse_batching(batching),
            device=parse_device(device),
            platform=check_name(platform, field="platform"),
            prediction_log=parse_prediction_log(prediction_log),
        )
        await self._require_artifact(artifact_sha256)
        stored, rollout = await self._insert_version(record)
        # An identical re-register republishes too: a retry after an etcd failure repairs it.
        await self._publish_if_stale(f"models/{model}/{version}", stored.value.to_json())
        if rollout is not None:
            await self._publish_if_stale(f"rollouts/{model}", rollout.to_json())
        return stored

    async def _require_artifact(self, sha256: str) -> None:
        try:
            await self._artifacts.info(sha256)
        except NotFound:
            raise InvalidInput(
                f"artifact_sha256: no artifact {sha256} in the registry; upload it first"
            ) from None

    async def _insert_version(
        self, record: ModelVersion
    ) -> tuple[Stored[ModelVersion], Rollout | None]:
        first = Rollout.stable(record.model, record.version)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(queries.INSERT_MODEL, record.model, "")
            inserted = await conn.fetchval(
                queries.INSERT_VERSION, record.model, record.version, record.to_json(),
                record.sha256,
            )
            if inserted is None:
                existing = await conn.fetchval(queries.VERSION, record.model, record.version)
                rollout = await conn.fetchval(queries.ROLLOUT, record.model)
                same = _check_same(ModelVersion.from_json(existing), record)
                return Stored(same, False), None if rollout is None else Rollout.from_json(rollout)
            made = await conn.fetchval(queries.INSERT_ROLLOUT, record.model, first.epoch,
                                       first.to_json())
            if made is not None:
                await conn.execute(queries.INSERT_HISTORY, record.model, first.epoch,
                                   first.to_json(), "registry", "first version")
        return Stored(record, True), first if made is not None else None

    # -- etcd -----------------------------------------------------------------------------

    async def _publish(self, key: str, value: dict[str, Any]) -> bool:
        """Put `value` at `key`; False when a rollout key already holds a newer epoch."""
        full_key = (self._prefix + key).encode()
        try:
            if key.startswith("rollouts/"):
                # The control API publishes rollouts too: compare-and-swap, never regress.
                epoch = int(value.get("epoch", 1))
                return await publish_newer(self._etcd, full_key, value, epoch=epoch)
            await self._etcd.put(full_key, orjson.dumps(value))
            return True
        except Exception as exc:  # aetcd raises several unrelated types for "etcd is away"
            raise _unpublished(key, exc) from exc

    async def reconcile(self) -> int:
        """Republish every version and rollout record from Postgres that etcd lacks or has stale.

        Returns the number of keys written. A rollout in etcd with a higher epoch than in
        Postgres is left alone (a newer write is on its way to Postgres' view of the world).
        """
        async with self._pool.acquire() as conn:
            versions = await conn.fetch(queries.ALL_VERSIONS)
            rollouts = await conn.fetch(queries.ALL_ROLLOUTS)
        published = await self._published()
        desired = {f"models/{r['model']}/{r['version']}": r["record"] for r in versions}
        desired |= {f"rollouts/{r['model']}": r["record"] for r in rollouts}
        written = 0
        for key, record in desired.items():
            if _stale(published.get(key), record) and await self._publish(key, record):
                written += 1
        if written:
            log.info("reconcile republished %d etcd keys", written)
        return written

    async def reconcile_forever(self, interval: float) -> None:
        """Run `reconcile()` every `interval` seconds until cancelled; failures are logged."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile()
            except Exception as exc:
                log.warning("reconcile failed (%r); retrying in %.0fs", exc, interval)

    async def _publish_if_stale(self, key: str, value: dict[str, Any]) -> None:
        try:
            current = await self._etcd.get((self._prefix + key).encode())
            published = None if current is None else orjson.loads(current.value)
        except orjson.JSONDecodeError:
            published = None
        except Exception as exc:
            raise _unpublished(key, exc) from exc
        if _stale(published, value):
            await self._publish(key, value)

    async def _published(self) -> dict[str, Any]:
        current: dict[str, Any] = {}
        for sub in ("models/", "rollouts/"):
            for kv in await self._etcd.get_prefix((self._prefix + sub).encode()):
                try:
                    current[kv.key.decode()[len(self._prefix):]] = orjson.loads(kv.value)
                except orjson.JSONDecodeError:
                    continue  # garbage in etcd: reconcile overwrites it
        return current


def _unpublished(key: str, exc: Exception) -> Unavailable:
    return Unavailable(
        f"saved, but publishing {key} to etcd failed ({exc!r}); the registry's reconcile "
        "loop will republish it, or retry"
    )


def _stale(published: Any, record: dict[str, Any]) -> bool:
    if published == record:
        return False
    if isinstance(published, dict) and "routes" in record:
        return int(published.get("epoch", 0)) <= int(record.get("epoch", 0))
    return True


def _check_same(existing: ModelVersion, wanted: ModelVersion) -> ModelVersion:
    # artifact_uri is derived from the registry's public URL, which may change between runs.
    def content(v: ModelVersion) -> dict[str, Any]:
        return {k: val for k, val in v.to_json().items() if k != "artifact_uri"}

    if content(existing) != content(wanted):
        raise VersionConflict(
            f"version {wanted.version} of model {wanted.model} already exists with a different "
            "artifact/signature; versions are immutable, register a new version"
        )
    return existing
