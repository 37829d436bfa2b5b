"""Uploaded job inputs in Postgres (tables `job_inputs` and `job_input_rows`, migration 0010):
the `JobInputStore` of jobs_inputs.py, over the job store's pool. Rows go in with COPY, in the
transaction that inserts their upload; expired uploads go with the job runners' sweep
(`PostgresJobStore.sweep`). Every failure to reach Postgres is Unavailable, as for jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from services.gateway.jobs_inputs import InputsRecord, NewInputs
from services.gateway.jobs_store import _DOWN, RETRY_AFTER
from services.mesh.domain.errors import Unavailable

T = TypeVar("T")
_RECORD = "id, tenant, rows_total, bytes, sha256, created_at, expires_at"
_LIVE = "id = $1 AND tenant = $2 AND expires_at > now()"
"""An upload past its expiry is gone to its owner even before the sweep deletes it."""


class PostgresJobInputStore:
    """Uploads over a pool the caller owns."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 10.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                return await work(conn)
        except _DOWN as exc:
            raise Unavailable("job inputs are unavailable right now: the database is "
                              "unreachable; retry later", retry_after=RETRY_AFTER) from exc

    async def put(self, inputs: NewInputs, *, retention_s: float) -> InputsRecord:
        async def insert(conn: asyncpg.Connection) -> InputsRecord:
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"INSERT INTO job_inputs (id, tenant, rows_total, bytes, sha256, expires_at)"
                    f" VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))"
                    f" RETURNING {_RECORD}", inputs.id, inputs.tenant, len(inputs.rows),
                    inputs.size, inputs.sha256, retention_s)
                await conn.copy_records_to_table(
                    "job_input_rows", columns=("input_id", "idx", "input"),
                    records=((inputs.id, idx, raw) for idx, raw in enumerate(inputs.rows)))
            return _record(row)
        return await self._run(insert)

    async def get(self, tenant: str, input_id: str) -> InputsRecord | None:
        row = await self._run(lambda conn: conn.fetchrow(
            f"SELECT {_RECORD} FROM job_inputs WHERE {_LIVE}", input_id, tenant))
        return None if row is None else _record(row)

    async def rows(self, tenant: str, input_id: str) -> list[bytes] | None:
        async def read(conn: asyncpg.Connection) -> list[bytes] | None:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                if await conn.fetchval(f"SELECT id FROM job_inputs WHERE {_LIVE}",
                                       input_id, tenant) is None:
                    return None
                found = await conn.fetch("SELECT input FROM job_input_rows"
                                         " WHERE input_id = $1 ORDER BY idx", input_id)
            return [row["input"] for row in found]
        return await self._run(read)

    async def delete(self, tenant: str, input_id: str) -> bool:
        deleted = await self._run(lambda conn: conn.fetchval(
            f"DELETE FROM job_inputs WHERE {_LIVE} RETURNING id", input_id, tenant))
        return deleted is not None


def _record(row: Any) -> InputsRecord:
    return InputsRecord(**{name: row[name] for name in _FIELDS})


_FIELDS = tuple(name.strip() for name in _RECORD.split(","))
