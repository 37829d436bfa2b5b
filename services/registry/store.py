"""The registry's `RegistryStore` over Postgres (the truth) and etcd (the published copy).

SQL lives in `queries`, the model reads shared with the control API in `reads`, and rollouts
are published with `publish_newer` (compare-and-swap: the control API publishes them too).
etcd failures become Unavailable; Postgres errors propagate as asyncpg raises them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aetcd
import asyncpg
import orjson

from services.mesh.domain.errors import NotFound, Unavailable
from services.mesh.domain.types import ModelVersion, Rollout
from services.mesh.infra.publishing import publish_newer
from services.registry import queries, reads
from services.registry.ports import (
    ModelDetail,
    ModelSummary,
    VersionInsert,
    rollout_key,
    version_key,
)

HISTORY_AUTHOR = "registry"
"""Who the rollout history names for the rollout the registry creates with a first version."""


class PostgresEtcdStore:
    """Records in Postgres tables (migrations/0001_registry.sql), published under a prefix."""

    def __init__(self, pool: asyncpg.Pool, etcd: aetcd.Client, *, etcd_prefix: str) -> None:
        self._pool = pool
        self._etcd = etcd
        self._prefix = etcd_prefix

    # -- Postgres -------------------------------------------------------------------------

    async def create_model(self, name: str, description: str) -> bool:
        """Save a model unless one of that name exists; True when this call created it."""
        async with self._pool.acquire() as conn:
            created = await conn.fetchval(queries.INSERT_MODEL, name, description)
        return created is not None

    async def list_models(self) -> list[ModelSummary]:
        """Every model, by name."""
        return await reads.list_models(self._pool)

    async def model_summary(self, name: str) -> ModelSummary:
        """One model's list row; NotFound if unknown."""
        return await reads.model_summary(self._pool, name)

    async def model_detail(self, name: str) -> ModelDetail:
        """A model with its versions and rollout; NotFound if unknown."""
        return await reads.model_detail(self._pool, name)

    async def insert_version(
        self, record: ModelVersion, *, first_rollout: Rollout
    ) -> VersionInsert:
        """Save `record` (and its model) unless the version exists, in one transaction."""
        first = first_rollout
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(queries.INSERT_MODEL, record.model, "")
            inserted = await conn.fetchval(
                queries.INSERT_VERSION, record.model, record.version, record.to_json(),
                record.sha256,
            )
            if inserted is None:
                existing = await conn.fetchval(queries.VERSION, record.model, record.version)
                rollout = await conn.fetchval(queries.ROLLOUT, record.model)
                return VersionInsert(
                    ModelVersion.from_json(existing),
                    None if rollout is None else Rollout.from_json(rollout),
                )
            made = await conn.fetchval(queries.INSERT_ROLLOUT, record.model, first.epoch,
                                       first.to_json())
            if made is not None:
                await conn.execute(queries.INSERT_HISTORY, record.model, first.epoch,
                                   first.to_json(), HISTORY_AUTHOR, "first version")
        return VersionInsert(None, first if made is not None else None)

    async def update_version(
        self, model: str, version: str, change: Callable[[ModelVersion], ModelVersion]
    ) -> ModelVersion:
        """Replace a saved version record with `change(record)` under a row lock."""
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchval(queries.VERSION_FOR_UPDATE, model, version)
            if current is None:
                raise NotFound(f"unknown version '{version}' of model '{model}'")
            record = change(ModelVersion.from_json(current))
            await conn.execute(queries.UPDATE_VERSION, model, version, record.to_json())
        return record

    async def saved_records(self) -> dict[str, dict[str, Any]]:
        """Every saved version and rollout record, as JSON, by the key it is published at."""
        async with self._pool.acquire() as conn:
            versions = await conn.fetch(queries.ALL_VERSIONS)
            rollouts = await conn.fetch(queries.ALL_ROLLOUTS)
        saved = {version_key(r["model"], r["version"]): r["record"] for r in versions}
        return saved | {rollout_key(r["model"]): r["record"] for r in rollouts}

    # -- etcd -----------------------------------------------------------------------------

    async def published_record(self, key: str) -> Any:
        """The decoded record published at `key`; None if absent or not JSON."""
        try:
            current = await self._etcd.get((self._prefix + key).encode())
            return None if current is None else orjson.loads(current.value)
        except orjson.JSONDecodeError:
            return None
        except Exception as exc:  # aetcd raises several unrelated types for "etcd is away"
            raise _unpublished(key, exc) from exc

    async def published_records(self) -> dict[str, Any]:
        """Every decodable record published under models/ and rollouts/, by key."""
        current: dict[str, Any] = {}
        for sub in ("models/", "rollouts/"):
            try:
                published = await self._etcd.get_prefix((self._prefix + sub).encode())
            except Exception as exc:
                raise Unavailable(f"reading {sub} from etcd failed ({exc!r})") from exc
            for kv in published:
                try:
                    current[kv.key.decode()[len(self._prefix):]] = orjson.loads(kv.value)
                except orjson.JSONDecodeError:
                    continue  # garbage in etcd: reconcile overwrites it
        return current

    async def publish(self, key: str, record: dict[str, Any]) -> bool:
        """Put `record` at `key`; False when a rollout key already holds a newer epoch."""
        full_key = (self._prefix + key).encode()
        try:
            if key.startswith("rollouts/"):
                # The control API publishes rollouts too: compare-and-swap, never regress.
                epoch = int(record.get("epoch", 1))
                return await publish_newer(self._etcd, full_key, record, epoch=epoch)
            await self._etcd.put(full_key, orjson.dumps(record))
            return True
        except Exception as exc:
            raise _unpublished(key, exc) from exc


def _unpublished(key: str, exc: Exception) -> Unavailable:
    return Unavailable(
        f"saved, but publishing {key} to etcd failed ({exc!r}); the registry's reconcile "
        "loop will republish it, or retry"
    )
