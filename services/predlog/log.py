"""The prediction log: every prediction a router serves, on local disk before it is answered,
then in Postgres.

`record()` is what the request path pays: one small object added to the current group of the
journal (`journal`), and a future the router awaits before it sends the answer. The group is
converted, encoded and appended to the instance's spool with one write per group (once per loop
turn under load), so a router killed at any moment has lost no prediction it answered. `record()`
never raises; when too many records wait it drops and counts
(`infermesh_prediction_log_dropped_total{reason="buffer_full"}`) and returns None.

A background task (`start()`) takes the journaled rows every `flush_interval` seconds, or as
soon as `flush_rows` wait, and writes them with COPY (`table`), then marks them replayed in the
spool. When Postgres is unreachable the rows simply stay in the spool (fsynced), Postgres is
probed every `probe_interval` seconds, and once it answers again the spool is replayed in chunks,
oldest first. A spool (or journal) left by an earlier or killed run is replayed the same way.
Writes are idempotent (the table's primary key), so a row replayed twice is stored once.

A batch Postgres refuses (a value or index entry it will not take) is split until the rows it
refuses are found: those are set aside in the spool directory's `rejected.jsonl` (`rejects`)
and counted (`infermesh_prediction_log_rows_rejected_total`); their neighbours are written.

    record() ──▶ journal (one write per group) ──▶ Postgres (COPY via staging, ON CONFLICT DO
                   │                                  NOTHING), then the spool is consumed
                   └─ rows it cannot take ──▶ memory ──▶ Postgres, or spilled if it is down
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.mesh.domain.predictions import NONE
from services.mesh.domain.types import InferRequest, InferResponse
from services.predlog.journal import Journal
from services.predlog.metrics import PredictionLogMetrics
from services.predlog.rejects import RejectedRows
from services.predlog.rows import PredictionRecord, Row
from services.predlog.spool import Mark, Spool
from services.predlog.table import UNAVAILABLE, PredictionTable

log = logging.getLogger(__name__)

_BATCH_ROWS = 5000
"""Most rows written per step (and per replayed chunk)."""
_REPLAY_ATTEMPTS = 5
"""A spool chunk that fails this many times in a row while Postgres answers is dropped."""


class PredictionLog:
    """Journals prediction records to local disk and writes them to Postgres."""

    def __init__(
        self, table: PredictionTable, spool: Spool, *, registry: CollectorRegistry,
        max_buffered: int = 10_000, flush_interval: float = 0.5, flush_rows: int = 500,
        probe_interval: float = 1.0, rejected_max_bytes: int = 64 << 20,
    ) -> None:
        self._table = table
        self._spool = spool
        self._rejects = RejectedRows(spool.directory, max_bytes=rejected_max_bytes)
        self._max_buffered = max_buffered
        self._flush_interval = flush_interval
        self._flush_rows = flush_rows
        self._probe_interval = probe_interval
        self.metrics = PredictionLogMetrics(
            registry, buffered=self._buffered, spool_bytes=lambda: spool.size
        )
        self._journal = Journal(
            spool, self.metrics, max_mirrored=max_buffered, flush_rows=flush_rows,
            wake_writer=self._wake_up, connected=lambda: table.connected,
        )
        self._inflight: list[Row] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._next_probe = 0.0
        self._replay_failures = 0
        self._closing = False
        self._closed = False

    @property
    def spool_directory(self) -> Path:
        """Where this instance journals rows and spills them while Postgres is unavailable."""
        return self._spool.directory

    async def start(self) -> None:
        """Open the spool (adopting what earlier runs left) and start the writer task."""
        if self._closed or self._task is not None:
            raise RuntimeError("prediction log already started or closed")
        await self._spool.open()
        self._wake = asyncio.Event()
        self._journal.start()
        self._task = asyncio.create_task(self._run(), name="prediction-log")

    def record(
        self, request: InferRequest, response: InferResponse, *, received: float,
        latency: float, policy: str, shadow: bool = False, request_id: str | None = None,
    ) -> asyncio.Future[None] | None:
        """Log one served prediction (O(1), never blocks or raises); await the future it
        returns before sending the answer: it is done once the record is on local disk.

        `received` is the wall-clock time the router received the request, `latency` the
        seconds it took to answer, `policy` the served version's `prediction_log`; a shadow
        answer passes `shadow=True` and the primary request's id as `request_id`. None when
        the record was dropped (counted): there is nothing to wait for.
        """
        journal = self._journal
        if self._closed or (
            len(journal.group) + journal.committing + len(journal.unjournaled)
            >= self._max_buffered
        ):
            self.metrics.dropped("closed" if self._closed else "buffer_full")
            return None
        try:
            kept = policy != NONE
            record = PredictionRecord(
                received, request_id or request.request_id, request.tenant, request.model,
                response.version, response.parameters.get("bucket"), shadow, latency * 1000.0,
                request.trace.get("traceparent"), policy,
                request.inputs if kept else (), response.outputs if kept else (),
                response.parameters.get("features"), response.parameters.get("cache"),
            )
        except Exception:  # a malformed request must not fail its answer
            self.metrics.dropped("error")
            return None
        return journal.add(record)

    async def flush(self) -> None:
        """Wait until what was recorded is written to Postgres, or on disk if it is down (one
        probe is tried first); when Postgres answers, until the spool is replayed too."""
        await self._journal.committed()
        if self._task is None or self._task.done():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake_up()
        await waiter

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop accepting records; journal what was recorded and write it to Postgres (what
        cannot be written within `timeout` stays on disk for the next run)."""
        self._closed = True
        deadline = time.monotonic() + timeout
        await self._journal.aclose(timeout)
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            self._wake_up()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await self._spill_remaining()
        for waiter in self._waiters:  # everything is written or on disk now
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        await self._table.close()
        await self._spool.close()

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _buffered(self) -> int:
        journal = self._journal
        return (len(journal.group) + journal.committing + len(journal.unjournaled)
                + journal.mirror_rows + len(self._inflight))

    # -- the writer task ---------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._urgent():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._flush_interval):
                        await self._wake.wait()
            self._wake.clear()
            closing = self._closing
            try:
                await self._step()
            except Exception:
                log.exception("prediction log: writer step failed")
                self.metrics.dropped("error", len(self._inflight))
                self._inflight = []
                self._journal.drop_mirror()  # on disk: replayed from there
                await asyncio.sleep(self._flush_interval)
            if closing and self._done_closing():
                return
            if self._waiters and self._settled():
                for waiter in self._waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                self._waiters.clear()

    def _urgent(self) -> bool:
        journal = self._journal
        return (
            self._closing or bool(self._waiters) or len(journal.unjournaled) >= self._flush_rows
            or journal.mirror_rows >= self._flush_rows or self._backlog()
        )

    def _backlog(self) -> bool:
        """Rows on disk to replay from there (not mirrored in memory) while Postgres answers."""
        return self._table.connected and not self._journal.mirrored and self._spool.pending

    def _settled(self) -> bool:
        journal = self._journal
        return not journal.unjournaled and not self._backlog() and not (
            self._table.connected and journal.mirror_rows
        )

    def _done_closing(self) -> bool:
        """Closing: this run's rows are written, or on disk because Postgres is unavailable
        (a backlog from disk is left for the next run)."""
        journal = self._journal
        return not journal.unjournaled and not (self._table.connected and journal.mirror_rows)

    async def _step(self) -> None:
        journal = self._journal
        if not self._table.connected:
            await self._probe(force=bool(self._waiters) or self._closing)
        if not self._table.connected:
            self.metrics.spilled.inc(journal.drop_mirror())  # on disk: replayed once it is back
            await self._spool.sync()
        if journal.unjournaled:
            self._inflight = journal.unjournaled[:_BATCH_ROWS]
            del journal.unjournaled[:_BATCH_ROWS]
            await self._deliver(self._inflight)
            self._inflight = []
        if not self._table.connected:
            return
        taken = journal.take_mirror(_BATCH_ROWS) if journal.mirrored else None
        if taken is not None:
            await self._write_journaled(*taken)
        elif self._backlog() and not self._closing:
            await self._replay_chunk()

    async def _probe(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now < self._next_probe:
            return
        self._next_probe = now + self._probe_interval
        try:
            await self._table.connect()
        except Exception as exc:
            self.metrics.went_down(exc)
            return
        self.metrics.came_back(self._spool.size)

    async def _write_journaled(self, rows: list[Row], mark: Mark) -> None:
        """Write journaled rows to Postgres, then consume the spool up to them."""
        try:
            written = await self._table.write_apart(rows)
        except Exception as exc:
            # Postgres went away, or an error that is not a refusal of these rows (those
            # write_apart sets aside): the rows stay in the spool, replayed later (a chunk that
            # keeps failing is given up after _REPLAY_ATTEMPTS).
            if not isinstance(exc, UNAVAILABLE):
                self._table.drop()
            self.metrics.went_down(exc)
            self.metrics.spilled.inc(len(rows) + self._journal.drop_mirror())
            await self._spool.sync()
            return
        else:
            self.metrics.written.inc(written.new)
            await self._set_aside(written.refused)
        await self._spool.consume_to(mark)

    async def _deliver(self, rows: list[Row]) -> None:
        """Write rows the journal did not take to Postgres, or spill them when it is down."""
        if not rows:
            return
        if self._table.connected:
            try:
                written = await self._table.write_apart(rows)
            except UNAVAILABLE as exc:
                self.metrics.went_down(exc)
            except Exception as exc:
                # Not a refusal of these rows (write_apart sets those aside): an error we do
                # not know. Spill and retry rather than lose answered predictions; a chunk
                # that keeps failing is given up after _REPLAY_ATTEMPTS.
                self._table.drop()
                self.metrics.went_down(exc)
            else:
                self.metrics.written.inc(written.new)
                await self._set_aside(written.refused)
                return
        await self._spill(rows)

    async def _set_aside(self, refused: list[tuple[Row, str]]) -> None:
        """Count the rows Postgres refused and keep them in the rejected file."""
        if not refused:
            return
        self.metrics.rejected(len(refused), refused[0][1])
        try:
            await self._rejects.append(refused)
        except OSError as exc:
            log.warning("prediction log: cannot keep %d refused row(s) in %s: %r",
                        len(refused), self._rejects.path, exc)

    async def _spill(self, rows: list[Row]) -> None:
        try:
            spilled = await self._spool.append(rows)
        except OSError as exc:
            self.metrics.dropped("spill_error", len(rows), reason_detail=repr(exc))
            return
        self.metrics.spilled.inc(spilled)
        if spilled < len(rows):
            self.metrics.dropped("spill_full", len(rows) - spilled)

    async def _replay_chunk(self) -> None:
        chunk = await self._spool.read(_BATCH_ROWS)
        if chunk is None:
            return
        if chunk.rows:
            try:
                written = await self._table.write_apart(chunk.rows)
            except Exception as exc:
                if isinstance(exc, UNAVAILABLE):
                    self.metrics.went_down(exc)
                self._replay_failures += 1
                if self._replay_failures < _REPLAY_ATTEMPTS:
                    return
                self.metrics.dropped("rejected", len(chunk.rows), reason_detail=repr(exc))
            else:
                self.metrics.written.inc(written.new)
                self.metrics.replayed.inc(len(chunk.rows) - len(written.refused))
                await self._set_aside(written.refused)
        self._replay_failures = 0
        self.metrics.dropped("corrupt", chunk.corrupt)
        await self._spool.consume(chunk)

    async def _spill_remaining(self) -> None:
        """After a forced stop: spill the rows that are in memory only."""
        rows = [*self._inflight, *self._journal.unjournaled]
        self._inflight, self._journal.unjournaled = [], []
        if rows:
            with contextlib.suppress(Exception):
                await self._spill(rows)


def _default_spool_root() -> Path:
    """`<tmp>/infermesh-spool-<uid>`: this user's alone (0700), never a directory another user
    made or can read, since spooled rows carry tenants' inputs and outputs."""
    root = Path(tempfile.gettempdir()) / f"infermesh-spool-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    found = root.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise RuntimeError(f"{root} is not a private directory of this user; set "
                           "INFERMESH_ROUTER_PREDICTION_LOG_SPOOL to one")
    return root


async def start_prediction_log(
    database_url: str, *, registry: CollectorRegistry, instance: str, spool_root: str = "",
    max_buffered: int = 10_000, spill_max_bytes: int = 1 << 30,
) -> PredictionLog | None:
    """A prediction log writing to `database_url`, started; None (logged) without one.

    Postgres need not be up: rows spill under `<spool_root>/<instance>/` (`spool_root` empty:
    `<tmp>/infermesh-spool-<uid>`, 0700) until it is. The caller closes it (`aclose`).
    """
    if not database_url:
        log.warning("prediction log off: no database URL (INFERMESH_DATABASE_URL)")
        return None
    root = spool_root or str(await asyncio.to_thread(_default_spool_root))
    prediction_log = PredictionLog(
        PredictionTable(database_url),
        Spool(Path(root), instance, max_bytes=spill_max_bytes),
        registry=registry, max_buffered=max_buffered,
    )
    await prediction_log.start()
    log.info("prediction log on; spool %s", prediction_log.spool_directory)
    return prediction_log
