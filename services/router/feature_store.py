"""The feature store's read side in Postgres (table `features`, migration 0007).

Like the prediction log, the router must serve with Postgres down: the pool opens no connection
at start, and every failure (refused, reset, timed out, table missing) is StoreDown, which the
caller (`features.OnlineFeatures`) answers with defaults. One query serves a whole batch of keys:
the four key columns are passed as arrays and joined on the primary key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg

from services.mesh.infra.db import create_pool
from services.router.features import FeatureRows, FeatureValue, Key, StoreDown

log = logging.getLogger(__name__)

SELECT = """
SELECT f.tenant, f.entity_type, f.entity_id, f.name, f.value, f.event_time
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
     AS k(tenant, entity_type, entity_id, name)
JOIN features f USING (tenant, entity_type, entity_id, name)
"""

_DOWN = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PostgresFeatureRows:
    """`FeatureRows` over a pool the caller owns (see `open_feature_rows`)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._failing = False
        """True after a failed fetch, until one succeeds: logged once per outage."""

    async def fetch(self, keys: Sequence[Key]) -> dict[Key, FeatureValue]:
        """The stored values of `keys`, in one query; StoreDown when Postgres cannot answer."""
        columns = [list(column) for column in zip(*keys, strict=True)] if keys else [[]] * 4
        try:
            records = await self._pool.fetch(SELECT, *columns)
        except _DOWN as exc:
            if not self._failing:
                log.warning("feature store unreachable (%r): serving defaults", exc)
            self._failing = True
            raise StoreDown(str(exc)) from exc
        self._failing = False
        return {
            (r["tenant"], r["entity_type"], r["entity_id"], r["name"]):
                FeatureValue(r["value"], r["event_time"].timestamp())
            for r in records
        }


@asynccontextmanager
async def open_feature_rows(dsn: str, *, max_size: int = 4) -> AsyncIterator[FeatureRows]:
    """The store over a fresh pool for `dsn` that opens no connection at start; closed on exit."""
    pool = await create_pool(dsn, min_size=0, max_size=max_size)
    try:
        # One connection opened now if Postgres answers soon, so the first lookups need not
        # connect within their timeout; if it does not, lookups connect when it is back.
        with contextlib.suppress(*_DOWN):
            await asyncio.wait_for(pool.fetchval("SELECT 1"), 2.0)
        yield PostgresFeatureRows(pool)
    finally:
        try:
            await asyncio.wait_for(pool.close(), 2.0)
        except TimeoutError:
            pool.terminate()
