"""The job runner: a task in each gateway that claims jobs from the store and runs their rows
through the gateway core, in the bulk lane, under the tenant's quotas.

One job at a time per runner, its lease renewed every third of `lease_s`. A job's rows stream
through `concurrency` workers: a feeder reads pending rows in index order, each worker takes up
to `pack_rows` of them at a time and runs them as one request where they may share one
(jobs_packing.py: a row alone costs a whole request at every hop, and realtime traffic beside
a job needs that CPU), and finished rows are written `chunk_rows` at a time (one transaction each,
one at a time, so at most about two chunks and the rows in flight are lost by a crash, to be
run again by whoever takes the job over). A lost lease (the job cancelled, or taken over after
this runner stalled) stops the run without writing anything more.

A row that fails on its own (bad data for the model, the model failing on it) stores its
error and the job goes on; a row refused for load (quota, overload, deadline, no worker) is
retried with backoff, and stored as failed after `max_attempts`. A job whose tenant or model
is gone fails as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from services.gateway.access import Access
from services.gateway.auth import AuthFailure
from services.gateway.core import Admission, Gateway
from services.gateway.jobs import ClaimedJob, JobStore, RowOutcome, error_output
from services.gateway.jobs_pacing import rest_after
from services.gateway.jobs_packing import join, packable, packs, unpack
from services.gateway.jobs_rows import decode_row
from services.gateway.metrics import GatewayMetrics
from services.gateway.quotas import rate_limited
from services.gateway.rest import encode_infer
from services.mesh.domain.errors import (
    DeadlineExceeded,
    InfermeshError,
    NotFound,
    Overloaded,
    QuotaExceeded,
    Unavailable,
)
from services.mesh.domain.types import InferRequest

log = logging.getLogger(__name__)

BULK = "bulk"
TRANSIENT = (Overloaded, Unavailable, DeadlineExceeded)
"""Refusals for load, not for the row: retried (QuotaExceeded is an Overloaded)."""


class JobFailed(Exception):
    """The job as a whole cannot run (its tenant or model is gone)."""


class LeaseLost(Exception):
    """This runner no longer holds the job: it was cancelled or taken over."""


class RowExecutor(Protocol):
    async def run_many(self, job: ClaimedJob, rows: list[tuple[int, bytes]]) -> list[RowOutcome]:
        """Run these rows (index, request); one outcome each, or JobFailed."""
        ...


class GatewayRows:
    """Runs a job's rows as inference requests through the gateway core."""

    def __init__(
        self, core: Gateway, access: Access, *, max_attempts: int = 8,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._core = core
        self._access = access
        self._max_attempts = max_attempts
        self._sleep = sleep

    async def run(self, job: ClaimedJob, idx: int, raw: bytes) -> RowOutcome:
        attempts = 0
        while True:
            try:
                return RowOutcome(idx, "done", await self._once(job, idx, raw))
            except QuotaExceeded as exc:  # the tenant's own pace: wait, however long
                await self._sleep(_pause(exc, 1))
            except TRANSIENT as exc:
                attempts += 1
                if attempts >= self._max_attempts:
                    return RowOutcome(idx, "failed", error_output(exc))
                await self._sleep(_pause(exc, attempts))
            except NotFound as exc:
                raise JobFailed(exc.message) from exc
            except InfermeshError as exc:
                return RowOutcome(idx, "failed", error_output(exc))

    async def _once(self, job: ClaimedJob, idx: int, raw: bytes) -> bytes:
        with self._admit(job) as admission:
            request = decode_row(raw, model=job.model, version=job.version,
                                 request_id=f"{job.id}-{idx}", spec=admission.spec)
            response = await self._core.infer(request, admission=admission)
        return encode_infer(response)

    def _admit(self, job: ClaimedJob, cost: int = 1) -> Admission:
        tenant = self._access.tenant(job.tenant, job.model)
        if isinstance(tenant, AuthFailure):
            raise JobFailed(tenant.message)
        admission = self._core.admit_tenant(tenant, job.model, job.version, cost=cost)
        admission.lane = BULK
        return admission

    async def run_many(self, job: ClaimedJob, rows: list[tuple[int, bytes]]) -> list[RowOutcome]:
        """Run rows, packed into shared requests where they may be (see jobs_packing.py); a
        row that does not decode, or does not pack, runs alone."""
        if len(rows) == 1:
            return list(await asyncio.gather(*(self.run(job, *row) for row in rows)))
        try:
            spec = self._core.resolve(job.model, job.version)
        except NotFound as exc:
            raise JobFailed(exc.message) from exc
        if not packable(spec):
            return list(await asyncio.gather(*(self.run(job, *row) for row in rows)))
        alone: list[tuple[int, bytes]] = []
        decoded: dict[int, tuple[int, bytes]] = {}
        requests: list[InferRequest] = []
        for idx, raw in rows:
            try:
                request = decode_row(raw, model=job.model, version=job.version,
                                     request_id=f"{job.id}-{idx}", spec=spec)
            except InfermeshError:
                alone.append((idx, raw))  # it fails alone, naming its own field
                continue
            decoded[id(request)] = (idx, raw)
            requests.append(request)
        max_rows = min(spec.batching.max_batch_size, self._burst_rows(job))
        runs: list[Awaitable[list[RowOutcome]]] = [
            self._run_pack(job, group, [decoded[id(r)] for r in group])
            for group in packs(requests, max_rows)
        ]
        runs += [self.run_many(job, [row]) for row in alone]
        return [outcome for outcomes in await asyncio.gather(*runs) for outcome in outcomes]

    def _burst_rows(self, job: ClaimedJob) -> int:
        """The most rows a pack of this job's tenant may carry: its burst when it has a rate
        quota (a pack takes a token per row; a larger one would leave the bucket in debt and
        hold up the tenant's realtime requests behind it), else no limit."""
        tenant = self._access.tenant(job.tenant, job.model)
        if isinstance(tenant, AuthFailure):
            raise JobFailed(tenant.message)
        return max(1, tenant.burst) if rate_limited(tenant.rate) else 1 << 30

    async def _run_pack(
        self, job: ClaimedJob, group: list[InferRequest], rows: list[tuple[int, bytes]],
    ) -> list[RowOutcome]:
        """`run` for a pack: refusals for load retry the pack; an error of the model or the
        data runs each row alone, so only the row at fault fails."""
        if len(group) == 1:
            return [await self.run(job, *rows[0])]
        attempts = 0
        while True:
            try:
                with self._admit(job, cost=len(group)) as admission:
                    joined = join(group, f"{job.id}-{rows[0][0]}+{len(group)}")
                    response = await self._core.infer(joined, admission=admission)
                return [RowOutcome(idx, "done", encode_infer(answer))
                        for (idx, _), answer in zip(rows, unpack(response, group), strict=True)]
            except QuotaExceeded as exc:
                await self._sleep(_pause(exc, 1))
            except TRANSIENT as exc:
                attempts += 1
                if attempts >= self._max_attempts:
                    return [RowOutcome(idx, "failed", error_output(exc)) for idx, _ in rows]
                await self._sleep(_pause(exc, attempts))
            except NotFound as exc:
                raise JobFailed(exc.message) from exc
            except InfermeshError:
                return list(await asyncio.gather(*(self.run(job, *row) for row in rows)))


def _pause(error: InfermeshError, attempts: int) -> float:
    """Seconds before trying a refused row again: what the refusal asked, else backoff."""
    if error.retry_after is not None:
        return min(max(float(error.retry_after), 0.01), 30.0)
    return min(0.05 * 2.0 ** attempts, 5.0)


class JobRunner:
    """Claims and runs jobs until closed. `start()` in the running loop, `aclose()` to stop."""

    def __init__(
        self, store: JobStore, rows: RowExecutor, *, runner_id: str | None = None,
        lease_s: float = 30.0, concurrency: int = 4, pack_rows: int = 32, chunk_rows: int = 256,
        poll_s: float = 1.0, retention_s: float = 7 * 86400.0, sweep_every_s: float = 60.0,
        metrics: GatewayMetrics | None = None, duty: float = 1.0,
        realtime_age: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.runner_id = runner_id or f"{os.uname().nodename}-{os.getpid()}-{os.urandom(4).hex()}"
        self._store = store
        self._rows = rows
        self._lease_s = lease_s
        self._concurrency = concurrency
        self._pack_rows = pack_rows
        self._chunk_rows = chunk_rows
        self._poll_s = poll_s
        self._retention_s = retention_s
        self._sweep_every_s = sweep_every_s
        self.metrics = metrics
        self._duty = duty
        """Share of the time each request slot may be busy while realtime traffic is served
        here (jobs_pacing.py); 1: never rests."""
        self._realtime_age = realtime_age or (lambda: 0.0)
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    def start(self) -> None:
        if self._closed or self._task is not None:
            raise RuntimeError("a job runner starts once")
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    def wake(self) -> None:
        """Look for a job now (one was just submitted here)."""
        if self._wake is not None:
            self._wake.set()

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep, failures = loop.time(), 0
        while True:
            try:
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self._sweep_every_s
                    if swept := await self._store.sweep():
                        log.info("deleted %d expired jobs and job inputs", swept)
                await self.count_queued()
                ran = await self.run_one()
                failures = 0
                if not ran:
                    await self._idle(self._poll_s)
            except Exception as exc:  # Postgres away, or a bug: said once, then backing off
                if failures == 0:
                    log.warning("job runner failed (%r); retrying with backoff", exc,
                                exc_info=not isinstance(exc, Unavailable))
                failures += 1
                await self._idle(min(self._poll_s * 2.0 ** failures, 30.0))

    async def _idle(self, seconds: float) -> None:
        assert self._wake is not None, "started"
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def run_one(self) -> bool:
        """Claim one runnable job and run it to its end or the loss of its lease; False when
        there was none."""
        job = await self._store.claim(self.runner_id, lease_s=self._lease_s)
        if job is None:
            return False
        log.info("running job %s (%s, tenant %s)", job.id, job.model, job.tenant)
        lease = asyncio.create_task(self._keep_lease(job))
        try:
            error = await _JobRun(self, job).run()
        except LeaseLost:
            log.info("job %s: lease lost (cancelled or taken over); stopping", job.id)
            return True
        finally:
            lease.cancel()
        if not await self._store.finish(job.id, self.runner_id, error=error,
                                        retention_s=self._retention_s):
            log.warning("job %s: rows still pending after a run; running them again", job.id)
        return True

    async def _keep_lease(self, job: ClaimedJob) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                if not await self._store.renew(job.id, self.runner_id, lease_s=self._lease_s):
                    return  # the next chunk's write finds out and stops the run
                await self.count_queued()  # a long job must not freeze the gauge
            except Unavailable:
                log.warning("job %s: cannot renew the lease now", job.id)

    async def count_queued(self) -> None:
        """Refresh the queue-depth gauge (every poll, and while a job runs, every lease
        renewal)."""
        if self.metrics is not None:
            self.metrics.jobs_queued.set(await self._store.queued())


class _JobRun:
    """One run of one job: a feeder, `concurrency` workers, chunked writes."""

    def __init__(self, runner: JobRunner, job: ClaimedJob) -> None:
        self._runner, self._job = runner, job
        self._queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(
            maxsize=runner._chunk_rows)
        self._finished: list[RowOutcome] = []
        self._writing = asyncio.Lock()

    async def run(self) -> str | None:
        """Run every pending row; the job's error when it failed as a whole."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._feed())
                for _ in range(self._runner._concurrency):
                    group.create_task(self._work())
        except* JobFailed as failed:
            error: str | None = str(failed.exceptions[0])
        except* LeaseLost as lost:
            raise lost.exceptions[0] from None
        else:
            error = None
        if error is not None:
            return error
        async with self._writing:
            await self._write()
        return None

    async def _feed(self) -> None:
        runner, after = self._runner, -1
        while rows := await runner._store.pending(self._job.id, after=after,
                                                  limit=runner._chunk_rows):
            for row in rows:
                await self._queue.put(row)
            after = rows[-1][0]
        for _ in range(runner._concurrency):
            await self._queue.put(None)

    async def _work(self) -> None:
        chunk, pack = self._runner._chunk_rows, self._runner._pack_rows
        runner = self._runner
        while rows := await self._take(pack):
            began = runner._clock()
            outcomes = await runner._rows.run_many(self._job, rows)
            self._finished.extend(outcomes)  # after the await: a write may swap the list
            if rest := rest_after(runner._clock() - began, duty=runner._duty,
                                  realtime_age_s=runner._realtime_age()):
                await runner._sleep(rest)
            # One write at a time; the rows behind it wait only when two chunks pile up.
            if len(self._finished) >= chunk and (
                not self._writing.locked() or len(self._finished) >= 2 * chunk
            ):
                async with self._writing:
                    await self._write()

    async def _take(self, most: int) -> list[tuple[int, bytes]]:
        """The next rows for one request: one, waited for, then up to `most` of those queued
        already; none once the feeder has ended."""
        row = await self._queue.get()
        if row is None:
            return []
        rows = [row]
        while len(rows) < most and not self._queue.empty():
            if (row := self._queue.get_nowait()) is None:
                self._queue.put_nowait(None)  # this worker's end, for its next call
                break
            rows.append(row)
        return rows

    async def _write(self) -> None:
        batch, self._finished = self._finished, []
        if not batch:
            return
        runner = self._runner
        if not await runner._store.complete(self._job.id, runner.runner_id, batch,
                                            lease_s=runner._lease_s):
            raise LeaseLost(self._job.id)
        if runner.metrics is not None:
            for status in ("done", "failed"):
                if count := sum(outcome.status == status for outcome in batch):
                    runner.metrics.job_rows.labels(self._job.tenant, status).inc(count)
