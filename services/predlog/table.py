"""The prediction log's writer: rows into the day-partitioned `predictions` table, idempotently.

One connection, opened by `connect()` and dropped on any sign that Postgres went away. A batch
is COPYed (binary) into a temporary staging table and moved with `INSERT ... ON CONFLICT DO
NOTHING` in one transaction: rows already there (a replayed spill, a retried batch whose commit
was in doubt) are skipped, so a row is never written twice. The day partitions a batch needs
are created first (`infermesh_ensure_prediction_partition`, safe concurrently) and remembered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import date
from typing import NamedTuple

import asyncpg

from services.predlog.rows import COLUMNS, Row

_STAGING = "predictions_staging"
_CREATE_STAGING = (
    f"CREATE TEMP TABLE {_STAGING} (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DROP"
)
_MOVE = f"INSERT INTO predictions SELECT * FROM {_STAGING} ON CONFLICT DO NOTHING"
_ENSURE_PARTITION = "SELECT infermesh_ensure_prediction_partition($1)"

UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # "cannot switch to state ...": a connection cut mid-COPY
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # disk full, too many connections
    asyncpg.exceptions.UndefinedTableError,  # migrations not applied yet
    asyncpg.exceptions.UndefinedFunctionError,
)
"""Errors meaning "Postgres cannot take rows now" (spill and retry), as opposed to a refusal of
these rows (any other PostgresError)."""

REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,  # class 22: a value the column type will not take
    asyncpg.exceptions.IntegrityConstraintViolationError,  # class 23: NOT NULL, CHECK, ...
    asyncpg.exceptions.ProgramLimitExceededError,  # class 54: an index row too big
    asyncpg.exceptions._base.DataError,  # asyncpg could not encode a value
)
"""Errors meaning "Postgres refused some of these rows": the rest of the batch can be written
without them (`PredictionLog` splits the batch to find them). Checked before `UNAVAILABLE`,
which holds asyncpg's encoding error as an InterfaceError."""


class Written(NamedTuple):
    """What `PredictionTable.write_apart` did with a batch."""

    new: int
    """Rows written that were not in the table yet."""
    refused: list[tuple[Row, str]]
    """The rows Postgres refused, each with its error; not written."""


class PredictionTable:
    """Writes prediction rows over one connection to `dsn`."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0,
                 write_timeout: float = 30.0) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        self._conn: asyncpg.Connection | None = None
        self._days: set[date] = set()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> None:
        """Open the connection unless it is open; raises what asyncpg raises when it cannot."""
        if self.connected:
            return
        self._conn = await asyncpg.connect(
            self._dsn, timeout=self._connect_timeout,
            server_settings={"application_name": "infermesh-prediction-log"},
        )
        self._days.clear()  # maybe another database, or partitions dropped meanwhile

    async def write(self, rows: Sequence[Row]) -> int:
        """Insert the rows not already in the table; returns how many were new.

        Raises a `REFUSED` error when Postgres refused one of the rows (nothing is written),
        an `UNAVAILABLE` error when Postgres went away (the connection is then dropped),
        another PostgresError when it failed otherwise.
        """
        conn = self._conn
        if conn is None or conn.is_closed():
            raise asyncpg.InterfaceError("prediction log: not connected")
        try:
            async with asyncio.timeout(self._write_timeout):
                return await self._write(conn, rows)
        except BaseException as exc:
            if isinstance(exc, REFUSED):
                raise  # the transaction rolled back; the connection is fine
            if isinstance(exc, (*UNAVAILABLE, asyncio.CancelledError)):
                self.drop()  # its state is unknown: never reuse it
            raise

    async def write_apart(self, rows: Sequence[Row]) -> Written:
        """Like `write`, but a batch Postgres refuses is split in halves until the rows it
        refuses are found: those are returned, every other row is written.

        Costs about two writes per refused row per halving (log2 of the batch size).
        """
        try:
            return Written(await self.write(rows), [])
        except REFUSED as exc:
            if len(rows) <= 1:
                return Written(0, [(row, f"{type(exc).__name__}: {exc}") for row in rows])
        half = len(rows) // 2
        first = await self.write_apart(rows[:half])
        second = await self.write_apart(rows[half:])
        return Written(first.new + second.new, first.refused + second.refused)

    async def _write(self, conn: asyncpg.Connection, rows: Sequence[Row]) -> int:
        for day in sorted({row[0].date() for row in rows} - self._days):
            await conn.execute(_ENSURE_PARTITION, day)
            self._days.add(day)
        async with conn.transaction():
            await conn.execute(_CREATE_STAGING)
            await conn.copy_records_to_table(_STAGING, records=rows, columns=COLUMNS)
            status: str = await conn.execute(_MOVE)
        return int(status.rsplit(" ", 1)[-1])

    def drop(self) -> None:
        """Abandon the connection at once (no round trip)."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        """Close the connection gracefully, or abandon it if that does not work quickly."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2.0)
            except Exception:
                conn.terminate()
