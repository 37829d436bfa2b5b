"""Where the gateway writes online features: Postgres (table `features`, migration 0007).

Like the feedback store, nothing connects at start (the gateway serves inference with Postgres
down) and every wait is bounded: a write that cannot be stored gets Unavailable with a
Retry-After. One write, a single PUT or a bulk of thousands, is one transaction: the rows are
COPYed into a temporary staging table, then upserted (the newest `event_time` wins).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import orjson

from services.gateway.features import FeatureRow, FeatureWrites
from services.mesh.domain.errors import Unavailable
from services.mesh.infra.db import create_pool

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0
_STAGING = "features_staging"
_CREATE_STAGING = (
    f"CREATE TEMP TABLE {_STAGING} (entity_id text, name text, value text, "
    "event_time timestamptz) ON COMMIT DROP"
)
_UPSERT = f"""
INSERT INTO features (tenant, entity_type, entity_id, name, value, event_time)
SELECT DISTINCT ON (entity_id, name) $1, $2, entity_id, name, value::jsonb, event_time
FROM {_STAGING} ORDER BY entity_id, name, event_time DESC
ON CONFLICT (tenant, entity_type, entity_id, name) DO UPDATE
SET value = excluded.value, event_time = excluded.event_time, updated_at = now()
WHERE features.event_time <= excluded.event_time
"""
_DOWN = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PostgresFeatureWrites:
    """Feature rows in Postgres through a pool the caller owns (see `open_feature_writes`)."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 2.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def upsert(self, tenant: str, entity_type: str, rows: list[FeatureRow]) -> int:
        """Store `rows` in one transaction; how many values were inserted or replaced."""
        records = [(r.entity_id, r.name, orjson.dumps(r.value).decode(), r.event_time)
                   for r in rows]
        try:
            async with asyncio.timeout(self._timeout + len(rows) / 20_000):
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.execute(_CREATE_STAGING)
                    await conn.copy_records_to_table(_STAGING, records=records)
                    status: str = await conn.execute(_UPSERT, tenant, entity_type)
        except _DOWN as exc:
            log.warning("cannot store features in Postgres (%r); answering 503", exc)
            raise Unavailable(
                "features cannot be stored right now: the database is unreachable; retry later",
                retry_after=RETRY_AFTER,
            ) from exc
        return int(status.rsplit(" ", 1)[-1])


class NoFeatureWrites:
    """The store of a gateway with no database configured: every write is Unavailable."""

    async def upsert(self, tenant: str, entity_type: str, rows: list[FeatureRow]) -> int:
        raise Unavailable("features are not available on this gateway: it has no database "
                          "configured", retry_after=RETRY_AFTER)


@asynccontextmanager
async def open_feature_writes(dsn: str, *, timeout: float = 2.0) -> AsyncIterator[FeatureWrites]:
    """A store over a fresh pool for `dsn` (NoFeatureWrites when empty), closed on exit; opens
    no connection at start."""
    if not dsn:
        yield NoFeatureWrites()
        return
    pool = await create_pool(dsn, min_size=0, max_size=2)
    try:
        yield PostgresFeatureWrites(pool, timeout=timeout)
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except TimeoutError:
            pool.terminate()
