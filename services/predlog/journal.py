"""The prediction log's journal: each served prediction on local disk before its answer leaves.

`PredictionLog.record()` adds a record to the current group and hands back the group's future;
the router awaits it before it returns the response. One committer task takes the group as it
stands when it runs (everything recorded during the loop turn that created the group, plus
whatever arrived while the previous commit was in flight), converts it to rows, encodes them and
appends them to the spool with ONE write (on the spool's thread, or on the loop for a small
group), then releases every response waiting on the group at once: a group commit.

The write is not fsynced: a write(2) that returned is in the OS page cache, which survives the
death of the process (kill -9 included); a machine crash is out of scope here, and bounded by the
spool's own policy (the writer fsyncs the journal whenever Postgres is unavailable, so rows that
stay on disk for long are synced as spilled rows always were). A router restarted after a kill
adopts the journal like any spool it left, and replays it (`spool`).

The journaled rows are also kept in memory (the "mirror") while they are exactly what the spool
holds unreplayed, so the writer sends them to Postgres without reading them back; it then
consumes the spool up to their end. When the mirror stops matching the spool (Postgres went
down, rows left by an earlier run, more than `max_mirrored` rows waiting), it is dropped and the
writer replays from disk until the spool is empty again. Rows the journal cannot take (the spool
is full, the disk is) are kept in memory for the writer and counted (`unjournaled_total`); their
answers are never failed or held back.

    record() ──▶ group ──▶ rows ──one write──▶ spool file ──▶ (answers released)
                                 └──▶ mirror ──▶ writer ──▶ Postgres ──▶ spool consumed
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Callable

from services.predlog.metrics import PredictionLogMetrics
from services.predlog.rows import PredictionRecord, Row, to_row
from services.predlog.spool import Appended, Mark, Spool

_INLINE_RECORDS = 64
_INLINE_BYTES = 64 << 10
"""Groups this small (records, tensor bytes) are converted and written on the event loop (when
the spool's thread is idle): a thread hop costs more than their conversion and write."""


class Journal:
    """Group commits of prediction records into `spool`, and the rows committed meanwhile."""

    def __init__(self, spool: Spool, metrics: PredictionLogMetrics, *, max_mirrored: int,
                 flush_rows: int, wake_writer: Callable[[], None],
                 connected: Callable[[], bool]) -> None:
        self._spool = spool
        self._metrics = metrics
        self._max_mirrored = max_mirrored
        self._flush_rows = flush_rows
        self._wake_writer = wake_writer
        self._connected = connected
        self.group: list[PredictionRecord] = []
        self.committing = 0
        """Records in the commit in flight."""
        self.unjournaled: list[Row] = []
        """Rows the journal could not take: in memory only, for the writer."""
        self.mirror: collections.deque[tuple[list[Row], Mark]] = collections.deque()
        self.mirror_rows = 0
        self.mirrored = False
        """Whether `mirror` holds exactly what the spool holds unreplayed."""
        self._group_waiters: list[asyncio.Future[None]] = []
        self._commit_waiters: list[asyncio.Future[None]] | None = None
        """The answers waiting on the commit in flight (None: none in flight)."""
        self._wanted: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the committer task (in the running loop)."""
        self._wanted = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="prediction-journal")
        if self.group:
            self._wanted.set()

    def add(self, record: PredictionRecord) -> asyncio.Future[None] | None:
        """Add `record` to the current group; the future is done once the group is on disk
        (None before `start`). One future per record, so that a cancelled answer cancels
        only its own."""
        self.group.append(record)
        if self._wanted is None:
            return None
        done = asyncio.get_running_loop().create_future()
        self._group_waiters.append(done)
        self._wanted.set()
        return done

    async def committed(self) -> None:
        """Wait until what was added so far is committed (journaled or kept in memory)."""
        waiters = self._group_waiters if self.group else self._commit_waiters
        if waiters is not None and self._wanted is not None:
            done = asyncio.get_running_loop().create_future()
            waiters.append(done)
            await done

    async def aclose(self, timeout: float) -> None:
        """Commit what was added, within `timeout`; then release every waiting answer."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and self._wanted is not None:
            self._wanted.set()
            _, pending = await asyncio.wait({task}, timeout=timeout)
            for late in pending:
                late.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await late
        records, self.group = self.group, []
        if records:  # the committer was stopped: these answers were not sent yet
            self.unjournaled.extend(await asyncio.to_thread(self._to_rows, records))
        _release(self._commit_waiters or [])
        _release(self._group_waiters)
        self._group_waiters = []

    def take_mirror(self, max_rows: int) -> tuple[list[Row], Mark] | None:
        """The oldest mirrored rows (whole groups, about `max_rows`) and where they end."""
        rows: list[Row] = []
        mark = None
        while self.mirror and len(rows) < max_rows:
            group, mark = self.mirror.popleft()
            rows += group
        self.mirror_rows -= len(rows)
        return None if mark is None else (rows, mark)

    def drop_mirror(self) -> int:
        """Stop mirroring (the writer replays from disk); returns how many rows were dropped."""
        dropped = self.mirror_rows
        self.mirror.clear()
        self.mirror_rows = 0
        self.mirrored = False
        return dropped

    async def _run(self) -> None:
        assert self._wanted is not None
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            records, self.group = self.group, []
            self._commit_waiters, self._group_waiters = self._group_waiters, []
            self.committing = len(records)
            try:
                if records:
                    await self._commit(records)
            finally:
                self.committing = 0
                _release(self._commit_waiters)
                self._commit_waiters = None
            if self._closed and not self.group:
                return

    async def _commit(self, records: list[PredictionRecord]) -> None:
        make_rows = functools.partial(self._to_rows, records)
        appended = None
        if len(records) <= _INLINE_RECORDS and (
            sum(r.tensor_bytes for r in records) <= _INLINE_BYTES
        ):
            appended = self._spool.append_now(make_rows)
        if appended is None:
            appended = await self._spool.append_from(make_rows)
        rows = appended.rows
        if appended.fitting < len(rows):
            reason = "spill_full" if appended.error is None else "spill_error"
            self._metrics.unjournaled(len(rows) - appended.fitting, reason,
                                      reason_detail=repr(appended.error or ""))
            self.unjournaled += rows[appended.fitting:]
            if len(self.unjournaled) >= self._flush_rows:
                self._wake_writer()
        if appended.mark is not None:
            self._journaled(appended, rows[:appended.fitting])

    def _journaled(self, appended: Appended, rows: list[Row]) -> None:
        assert appended.mark is not None
        self._metrics.journal_writes.inc()
        self._metrics.journaled.inc(len(rows))
        if appended.clean:
            self.drop_mirror()
            self.mirrored = True
        if not self.mirrored:
            if not self._connected():
                self._metrics.spilled.inc(len(rows))
            return
        self.mirror.append((rows, appended.mark))
        self.mirror_rows += len(rows)
        if self.mirror_rows > self._max_mirrored:
            self.drop_mirror()  # Postgres is slow: keep memory bounded, replay from disk
        elif self.mirror_rows >= self._flush_rows:
            self._wake_writer()

    def _to_rows(self, records: list[PredictionRecord]) -> list[Row]:
        rows = []
        for record in records:
            try:
                rows.append(to_row(record))
            except Exception as exc:  # a tensor whose bytes do not match its shape
                self._metrics.dropped("error", reason_detail=repr(exc))
        return rows


def _release(waiters: list[asyncio.Future[None]]) -> None:
    for done in waiters:
        if not done.done():
            done.set_result(None)
