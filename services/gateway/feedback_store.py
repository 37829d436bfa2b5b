"""Where the gateway keeps feedback: Postgres (table `feedback`, migration 0004), or nowhere.

The gateway must serve inference with Postgres down, so nothing here connects at start: the
pool is created with no connections and opens one on the first feedback post. Every wait is
bounded (`timeout` for a connection, then again for the write); a post that cannot be stored
gets Unavailable with a Retry-After, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from services.gateway.feedback import Feedback, FeedbackStore
from services.mesh.domain.errors import Unavailable
from services.mesh.infra.db import create_pool

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0
"""Seconds a client is told to wait after a 503."""

UPSERT = """
INSERT INTO feedback (tenant, request_id, kind, label, score) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant, request_id, kind)
DO UPDATE SET label = excluded.label, score = excluded.score, received_at = now()
"""

# What "Postgres is away" looks like through asyncpg: refused or reset connections (OSError),
# a timed-out connect, acquire or write, a server refusing (PostgresError: shutting down,
# unknown database, table missing), a broken connection (InterfaceError).
_DOWN = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PostgresFeedbackStore:
    """Feedback rows in Postgres through a pool the caller owns (see `open_feedback_store`)."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 2.0) -> None:
        self._pool = pool
        self._timeout = timeout
        self._failing = False
        """True after a failed write, until one succeeds: the log says so once per outage."""

    async def put(self, tenant: str, feedback: Feedback) -> None:
        """Upsert one row keyed by (tenant, request id, kind); Unavailable when Postgres is."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                await conn.execute(
                    UPSERT, tenant, feedback.request_id, feedback.kind, feedback.label,
                    feedback.score, timeout=self._timeout,
                )
        except _DOWN as exc:
            if not self._failing:
                log.warning("cannot store feedback in Postgres (%r); answering 503", exc)
            self._failing = True
            raise Unavailable(
                "feedback cannot be stored right now: the database is unreachable; retry later",
                retry_after=RETRY_AFTER,
            ) from exc
        if self._failing:
            log.info("storing feedback in Postgres again")
            self._failing = False


class NoFeedbackStore:
    """The store of a gateway with no database configured: every post is Unavailable."""

    async def put(self, tenant: str, feedback: Feedback) -> None:
        raise Unavailable(
            "feedback is not available on this gateway: it has no database configured",
            retry_after=RETRY_AFTER,
        )


@asynccontextmanager
async def open_feedback_store(dsn: str, *, timeout: float = 2.0) -> AsyncIterator[FeedbackStore]:
    """A store over a fresh pool for `dsn` (NoFeedbackStore when empty), closed on exit.

    Opens no connection: Postgres may be down when the gateway starts.
    """
    if not dsn:
        log.warning("no database configured (INFERMESH_DATABASE_URL): POST /v1/feedback "
                    "will answer 503")
        yield NoFeedbackStore()
        return
    pool = await create_pool(dsn, min_size=0, max_size=4)
    try:
        yield PostgresFeedbackStore(pool, timeout=timeout)
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except TimeoutError:
            pool.terminate()
