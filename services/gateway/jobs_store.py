"""Jobs in Postgres (tables `jobs` and `job_rows`, migration 0008): the `JobStore` of jobs.py.

Rows go in with COPY, in the transaction that inserts their job. A runner claims the oldest
runnable job whose lease is free or expired (`FOR UPDATE SKIP LOCKED`, so runners never wait
on each other) and writes each chunk's outputs and the job's progress in one statement that
first checks it still holds the lease: a runner that lost its job writes nothing, and a row's
output is written only while the row is `pending`. A chunk names its rows to the primary key
(`idx = ANY(...)`) and a large job refreshes the table's statistics as it goes in
(`ANALYZE_ROWS`): without both, a job the statistics did not know was taken for a handful of
rows, and every chunk's write scanned all of the job's rows (Postgres at a full core for
seconds at the start of a 100,000-row job, beside realtime traffic).

Like the feedback store, the pool opens no connection at start (the gateway serves inference
with Postgres down) and every failure to reach Postgres is Unavailable with a Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from services.gateway.jobs import ClaimedJob, JobRecord, NewJob, RowOutcome
from services.mesh.domain.errors import Unavailable
from services.mesh.infra.db import create_pool

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0
_DOWN = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
         asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError)
"""Postgres being away; any other error (a bug) is raised as it is, loudly."""
T = TypeVar("T")

ANALYZE_ROWS = 1000
"""A job of at least this many rows refreshes `job_rows`' statistics as it goes in (~80 ms
for 100,000 rows), so the chunk writes of its runner are planned as index lookups."""

_RECORD = """id, tenant, model, version, status, rows_total, rows_done, rows_failed, created_at,
started_at, finished_at, expires_at, error"""

CLAIM = """
UPDATE jobs SET runner = $1, lease_until = now() + make_interval(secs => $2),
    status = 'running', started_at = coalesce(started_at, now())
WHERE id = (SELECT id FROM jobs WHERE status IN ('queued', 'running')
            AND (lease_until IS NULL OR lease_until < now() OR runner = $1)
            ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, tenant, model, version
"""

RENEW = """
UPDATE jobs SET lease_until = now() + make_interval(secs => $3)
WHERE id = $1 AND runner = $2 AND status = 'running' RETURNING id
"""

COMPLETE = """
WITH owned AS (
    SELECT id FROM jobs WHERE id = $1 AND runner = $2 AND status = 'running' FOR UPDATE
), written AS (
    UPDATE job_rows r SET output = u.output, status = u.status
    FROM unnest($3::integer[], $4::text[], $5::bytea[]) AS u(idx, status, output), owned
    WHERE r.job_id = $1 AND r.idx = ANY($3::integer[]) AND r.job_id = owned.id
        AND r.idx = u.idx AND r.status = 'pending'
    RETURNING r.status
)
UPDATE jobs SET
    rows_done = rows_done + (SELECT count(*) FROM written WHERE status = 'done'),
    rows_failed = rows_failed + (SELECT count(*) FROM written WHERE status = 'failed'),
    lease_until = now() + make_interval(secs => $6)
FROM owned WHERE jobs.id = owned.id RETURNING jobs.id
"""

FINISH = f"""
UPDATE jobs SET status = CASE WHEN $3::text IS NULL THEN 'succeeded' ELSE 'failed' END,
    error = $3::text, finished_at = now(), lease_until = NULL,
    expires_at = now() + make_interval(secs => $4)
WHERE id = $1 AND runner = $2 AND status = 'running'
    AND ($3::text IS NOT NULL OR NOT EXISTS (
        SELECT 1 FROM job_rows WHERE job_id = $1 AND status = 'pending'))
RETURNING {_RECORD}, webhook_url, webhook_secret
"""

CANCEL = f"""
UPDATE jobs SET status = 'cancelled', finished_at = now(), lease_until = NULL,
    expires_at = now() + make_interval(secs => $3)
WHERE id = $1 AND tenant = $2 AND status IN ('queued', 'running')
RETURNING {_RECORD}, webhook_url, webhook_secret
"""

Finished = Callable[[JobRecord], None]
"""Told of every job as it finishes (succeeded, failed or cancelled), once: the metrics."""
Outbox = Callable[..., Awaitable[str]]
"""`services.webhooks.outbox.enqueue(conn, *, tenant, url, secret, event_type, payload)`:
queues a webhook in the caller's transaction; returns its webhook-id."""


class PostgresJobStore:
    """Jobs over a pool the caller owns (see `open_job_store`)."""

    def __init__(
        self, pool: asyncpg.Pool, *, timeout: float = 10.0, outbox: Outbox | None = None,
        on_finished: Finished | None = None,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._outbox = outbox
        """Queues the webhook of a job that finishes, in the transaction that finishes it."""
        self._on_finished = on_finished

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool, for the stores beside this one (uploaded job inputs)."""
        return self._pool

    async def _finishing(self, conn: asyncpg.Connection, sql: str, *args: Any) -> Any:
        """Run a statement that finishes a job and queue its webhook, in one transaction."""
        async with conn.transaction():
            row = await conn.fetchrow(sql, *args)
            if row is not None and row["webhook_url"] and self._outbox is not None:
                record = _record(row)
                await self._outbox(
                    conn, tenant=record.tenant, url=row["webhook_url"],
                    secret=row["webhook_secret"], event_type=f"job.{record.status}",
                    payload=_event(record))
        if row is not None and self._on_finished is not None:
            self._on_finished(_record(row))  # committed: counted once, by whoever finished it
        return row

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                return await work(conn)
        except _DOWN as exc:
            raise Unavailable("jobs are unavailable right now: the database is unreachable; "
                              "retry later", retry_after=RETRY_AFTER) from exc

    async def create(self, job: NewJob) -> JobRecord:
        async def insert(conn: asyncpg.Connection) -> JobRecord:
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"INSERT INTO jobs (id, tenant, model, version, rows_total, webhook_url,"
                    f" webhook_secret) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_RECORD}",
                    job.id, job.tenant, job.model, job.version, len(job.rows), job.webhook_url,
                    job.webhook_secret)
                await conn.copy_records_to_table(
                    "job_rows", columns=("job_id", "idx", "input"),
                    records=((job.id, idx, raw) for idx, raw in enumerate(job.rows)))
                if len(job.rows) >= ANALYZE_ROWS:
                    await conn.execute("ANALYZE job_rows")  # counts this transaction's rows
            return _record(row)
        return await self._run(insert)

    async def get(self, tenant: str, job_id: str) -> JobRecord | None:
        row = await self._run(lambda conn: conn.fetchrow(
            f"SELECT {_RECORD} FROM jobs WHERE id = $1 AND tenant = $2", job_id, tenant))
        return None if row is None else _record(row)

    async def outputs(self, tenant: str, job_id: str) -> list[bytes]:
        rows = await self._run(lambda conn: conn.fetch(
            "SELECT r.output FROM job_rows r JOIN jobs j ON j.id = r.job_id"
            " WHERE j.id = $1 AND j.tenant = $2 ORDER BY r.idx", job_id, tenant))
        return [row["output"] or b"null" for row in rows]

    async def cancel(self, tenant: str, job_id: str, *, retention_s: float) -> JobRecord | None:
        row = await self._run(
            lambda conn: self._finishing(conn, CANCEL, job_id, tenant, retention_s))
        if row is not None:
            return _record(row)
        return await self.get(tenant, job_id)

    async def claim(self, runner: str, *, lease_s: float) -> ClaimedJob | None:
        row = await self._run(lambda conn: conn.fetchrow(CLAIM, runner, lease_s))
        if row is None:
            return None
        return ClaimedJob(row["id"], row["tenant"], row["model"], row["version"])

    async def renew(self, job_id: str, runner: str, *, lease_s: float) -> bool:
        found = await self._run(lambda conn: conn.fetchval(RENEW, job_id, runner, lease_s))
        return found is not None

    async def pending(self, job_id: str, *, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows = await self._run(lambda conn: conn.fetch(
            "SELECT idx, input FROM job_rows WHERE job_id = $1 AND idx > $2"
            " AND status = 'pending' ORDER BY idx LIMIT $3", job_id, after, limit))
        return [(row["idx"], row["input"]) for row in rows]

    async def complete(
        self, job_id: str, runner: str, outcomes: list[RowOutcome], *, lease_s: float
    ) -> bool:
        found = await self._run(lambda conn: conn.fetchval(
            COMPLETE, job_id, runner, [o.idx for o in outcomes], [o.status for o in outcomes],
            [o.output for o in outcomes], lease_s))
        return found is not None

    async def finish(
        self, job_id: str, runner: str, *, error: str | None, retention_s: float
    ) -> bool:
        row = await self._run(
            lambda conn: self._finishing(conn, FINISH, job_id, runner, error, retention_s))
        return row is not None

    async def sweep(self) -> int:
        """Delete expired jobs and expired uploaded job inputs (jobs_inputs_store.py)."""
        async def delete(conn: asyncpg.Connection) -> int:
            jobs = await conn.fetch("DELETE FROM jobs WHERE expires_at < now() RETURNING id")
            inputs = await conn.fetch(
                "DELETE FROM job_inputs WHERE expires_at < now() RETURNING id")
            return len(jobs) + len(inputs)
        return await self._run(delete)

    async def queued(self) -> int:
        """How many jobs wait for a runner (all tenants)."""
        count = await self._run(lambda conn: conn.fetchval(
            "SELECT count(*) FROM jobs WHERE status = 'queued'"))
        return int(count)


def _record(row: Any) -> JobRecord:
    return JobRecord(**{name: row[name] for name in _FIELDS})


_FIELDS = tuple(name.strip() for name in _RECORD.split(","))


def _event(record: JobRecord) -> dict[str, Any]:
    """A job webhook's `data`: the job's status, as `GET /v1/jobs/{id}` shows it."""
    return record.to_json()


@asynccontextmanager
async def open_job_store(
    dsn: str, *, timeout: float = 10.0, outbox: Outbox | None = None,
    on_finished: Finished | None = None,
) -> AsyncIterator[PostgresJobStore]:
    """A store over a fresh pool for `dsn`, closed on exit; opens no connection at start."""
    pool = await create_pool(dsn, min_size=0, max_size=4)
    try:
        yield PostgresJobStore(pool, timeout=timeout, outbox=outbox, on_finished=on_finished)
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except TimeoutError:
            pool.terminate()
