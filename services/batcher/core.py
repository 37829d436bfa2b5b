"""The batcher core: queues per (model, version), batch formation, dispatch. No HTTP here.

Which requests wait, which are refused and which go next is the queue's business
(`fairness.FairQueue`: lanes, tenant weights, bounds); when a batch leaves is the batch window's
(`policy.plan_batch`); whether a request is admitted at all is `admission.refusal`'s, from the
latency model (`latency.VersionLatency`) the core feeds with every batch's execution time.
This class feeds them and runs their decisions on the workers (`dispatch.WorkerBook`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from services.batcher.admission import (
    MAX_HEADROOM,
    RECENT_MIN_SECONDS,
    STRICT_MAX_HEADROOM,
    Arrivals,
    Backlog,
    Headroom,
    completion,
    displaces,
    refusal,
    rows_ahead,
)
from services.batcher.batches import batch_span, batch_timeout, build_batch, shape_key
from services.batcher.bisection import Outcome, bisect, lone_failure
from services.batcher.coldstart import worker_expected
from services.batcher.deadlines import EarliestDeadline
from services.batcher.dispatch import WorkerBook
from services.batcher.fairness import FairQueue
from services.batcher.latency import VersionLatency
from services.batcher.metrics import BatcherMetrics, VersionMetrics
from services.batcher.policy import (
    MAX_RETRY_AFTER,
    MIN_RECHECK,
    Dispatch,
    drain_seconds,
    plan_batch,
)
from services.batcher.tenants import TenantWeights
from services.mesh.domain import tracing
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import (
    DeadlineExceeded,
    InfermeshError,
    InternalError,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from services.mesh.domain.hops import WorkerHandle, WorkerPool
from services.mesh.domain.tensors import Tensor, split_rows
from services.mesh.domain.types import BatchingPolicy, BatchResult, InferRequest, InferResponse

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Pending:
    request: InferRequest
    future: asyncio.Future[InferResponse]
    enqueued: float
    tenant: str
    lane: str
    rows: int
    span: tracing.HopSpan
    deadline: float | None = None
    """The request's (wall clock): what orders a tenant's queue (`edf.EdfQueue`)."""
    attempts: int = 0
    queued: bool = True


@dataclass(slots=True)
class _Queue:
    model: str
    version: str
    policy: BatchingPolicy
    pending: FairQueue[_Pending]
    metrics: VersionMetrics
    latency: VersionLatency
    deadlines: EarliestDeadline[_Pending]
    inflight: int = 0
    """Requests in batches on workers (for the pending-request gauge)."""
    inflight_rows: int = 0
    """Rows in batches on workers (for the autoscaler's in-flight gauge)."""
    timer: asyncio.TimerHandle | None = None
    batch_seconds: float = 0.0
    """Moving average of how long a worker takes for one batch of this version."""
    timer_due: float = 0.0
    """Loop time at which `timer` fires (uvloop's handles do not expose it)."""
    no_worker_since: float | None = None
    seeded: set[str] | None = None
    """Workers whose warm-up timings seeded `latency`."""
    pump_due: bool = False
    """Whether a look at the queue is scheduled for the next loop turn (`_pump_soon`)."""
    headroom: Headroom = field(default_factory=Headroom)
    """Admission's margin over the latency model, measured from its recent errors."""


class Batcher:
    """Forms batches per (model, version) and runs them on the least-loaded ready worker."""

    def __init__(
        self, catalog: ModelCatalog, workers: WorkerPool, *, pipeline_depth: int = 2,
        no_worker_grace: float = 5.0, bulk_max_wait: float = 1.0,
        metrics: BatcherMetrics | None = None, clock: Callable[[], float] = time.monotonic,
        tenant_weights: Callable[[str], float] | None = None, cold_start_grace: float = 300.0,
    ) -> None:
        self._catalog = catalog
        self._workers = workers
        self._depth = pipeline_depth
        self._grace = no_worker_grace
        self._cold_grace = cold_start_grace
        self._bulk_max_wait = bulk_max_wait
        self._metrics = metrics or BatcherMetrics()
        self._metrics.watch_queues(self._depths)
        self._metrics.watch_pending(self._pending_counts)
        self._metrics.watch_load(self._loads)
        self._clock = clock
        self._weights = tenant_weights or TenantWeights(catalog.config)
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._book = WorkerBook(clock)
        self._arrivals = Arrivals()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        """Re-check every queue whenever the set of workers changes; apply a version's queue
        policy whenever the registry changes it."""
        self._workers.subscribe(self._pump_all)
        self._catalog.config.subscribe(self._refresh_policies)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Queue one request (its version already chosen) and wait for its batch."""
        span = tracing.start("batcher.queue", request.trace, kind=tracing.CONSUMER)
        span.set("infermesh.request_id", request.request_id)
        span.set("infermesh.model", request.model)
        span.set("infermesh.version", request.version)
        span.set("infermesh.tenant", request.tenant)
        span.set("infermesh.lane", request.lane)
        span.set("infermesh.bucket", request.bucket)
        try:
            response = await self._infer(request, span)
        except BaseException as exc:
            span.end(exc)
            raise
        span.end()
        return response

    async def _infer(self, request: InferRequest, span: tracing.HopSpan) -> InferResponse:
        if self._closed:
            raise Unavailable("batcher is shutting down")
        assert request.version is not None, "the router chooses the version"
        _require_rows(request)
        queue = self._queue(request.model, request.version)
        self._arrivals.note(self._clock())
        self._refuse_unmeetable(queue, request)
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        pending = _Pending(
            request, future, self._clock(), request.tenant, request.lane, request.rows, span,
            request.deadline,
        )
        evicted = queue.pending.admit(pending)
        if evicted is None:
            self._metrics.count_refused(request.model, request.version)
            queue.metrics.refused("queue_full")
            error = self._full(queue, f"queue for {request.model}/{request.version} is full")
            queue.metrics.failed(error.code)
            raise error
        queue.deadlines.push(request.deadline, pending)
        if evicted:
            self._evict(queue, evicted)
        self._pump_soon(queue)
        try:
            response = await future
        except InfermeshError as exc:
            queue.metrics.failed(exc.code)
            raise
        queue.metrics.success.inc()
        return response

    def _queue(self, model: str, version: str) -> _Queue:
        queue = self._queues.get((model, version))
        if queue is None:
            policy = self._catalog.version(model, version).batching
            pending: FairQueue[_Pending] = FairQueue(
                policy.max_queue_size, self._weights, bulk_max_wait=self._bulk_max_wait
            )
            queue = self._queues[(model, version)] = _Queue(
                model, version, policy, pending, self._metrics.version(model, version),
                VersionLatency(self._clock), EarliestDeadline(_still_queued),
            )
        return queue

    def _refresh_policies(self) -> None:
        """A version's queue policy changed in etcd (the registry's PATCH): its queue uses the
        new one from its next decision on, without a restart. (The catalog, subscribed first,
        has parsed the change already.)"""
        for queue in list(self._queues.values()):
            try:
                policy = self._catalog.version(queue.model, queue.version).batching
            except InfermeshError:
                continue  # the version is gone: its queue drains under the last policy
            if policy != queue.policy:
                queue.policy = policy
                queue.pending.bound = policy.max_queue_size
                self._pump(queue)

    def _refuse_unmeetable(self, queue: _Queue, request: InferRequest) -> None:
        """Refuse at once (Overloaded, with Retry-After) a request the latency model says
        cannot finish before its deadline, see `admission.refusal`; fail one already past it."""
        if request.deadline is None:
            return
        slack = request.deadline - time.time()
        if slack <= 0:  # expired on arrival: a 504, never queued
            queue.metrics.missed("arrival")
            queue.metrics.failed(DeadlineExceeded.code)
            raise DeadlineExceeded("deadline exceeded before the request was queued")
        if queue.policy.admission == "off":
            return
        workers = self._workers.candidates(queue.model, queue.version)
        self._seed(queue, workers)
        standing = queue.pending.standing(request.tenant, request.lane, request.deadline)
        backlog = self._backlog(queue, workers, rows_ahead(standing, request.rows))
        margin = self._margin(queue, workers)
        strict = queue.policy.admission == "strict"
        # Its batch holds the rows due before it and, up to the batch size, those due after:
        # a 1 s request ahead of queued 3 s ones runs in a full batch, not a batch of one.
        ahead = min(max(backlog.queued_rows, queue.pending.rows) + request.rows,
                    queue.policy.max_batch_size)
        execution = queue.latency.predict(None, ahead)
        retry_after = refusal(
            backlog=backlog, execution=execution, slack=slack, headroom=margin, stretch=strict,
        )
        busy_for = None
        if retry_after is None:
            retry_after = self._displacing(queue, workers, request, margin)
            reason = "displaces_admitted"
        else:
            reason = "deadline_unmeetable"
            # When it would be answered, by the prediction that refused it. A later request
            # due no sooner has at least its rows ahead of it (earliest deadline first) and a
            # batch of its own: by the same prediction, it is refused too until then.
            clears = backlog.clears_in(margin if strict else 1.0)
            if clears is not None and execution is not None:
                busy_for = completion(clears, execution, headroom=margin, stretch=strict)
        if retry_after is not None:
            queue.metrics.refused(reason)
            queue.metrics.failed(Overloaded.code)
            raise Overloaded(
                f"{queue.model}/{queue.version} cannot answer before the deadline: "
                f"its backlog clears in {retry_after:.3f}s", retry_after=retry_after,
                busy_for=busy_for,
            )

    def _margin(self, queue: _Queue, workers: list[WorkerHandle]) -> float:
        """Admission's margin over the latency model: the version's measured one
        (`admission.Headroom`), raised while a long running batch has already run past its
        prediction by more (the machine is slow now; the batch's end will tell the
        Headroom, but only then: an encoder burst's first batch ran 1.5x its prediction, and
        what was admitted meanwhile on the calm margin missed)."""
        margin = self._measured_margin(queue, self._clock())
        book, latency = self._book, queue.latency
        cap = STRICT_MAX_HEADROOM if queue.policy.admission == "strict" else MAX_HEADROOM
        for worker in workers:
            rows = book.running_rows(worker.key)
            predicted = latency.predict(worker.key, rows) if rows else None
            if predicted is not None and predicted >= RECENT_MIN_SECONDS:
                margin = max(margin, min(book.running_for(worker.key) / predicted, cap))
        return margin

    def _measured_margin(self, queue: _Queue, now: float) -> float:
        """The version's measured margin (`admission.Headroom`); with `admission: strict`, at
        least the slowest recent long batch at about today's arrival rate (`Headroom.at`)."""
        if queue.policy.admission == "strict":
            return queue.headroom.at(self._arrivals, now)
        return queue.headroom.value

    def _displacing(
        self, queue: _Queue, workers: list[WorkerHandle], request: InferRequest, margin: float
    ) -> float | None:
        """The Retry-After of refusing `request` (which its own prediction admits) because
        it would run ahead of an admitted request of its tenant and make that one late
        (`admission.displaces`); None to admit it."""
        deadline = request.deadline
        found = (None if deadline is None
                 else queue.pending.displaced(request.tenant, request.lane, deadline))
        if found is None:
            return None
        last, standing = found
        due = last.deadline
        if due is None:
            return None
        last_backlog = self._backlog(queue, workers, rows_ahead(standing, last.rows))
        ahead = min(last_backlog.queued_rows + last.rows, queue.policy.max_batch_size)
        if not displaces(backlog=last_backlog, rows=request.rows,
                         execution=queue.latency.predict(None, ahead), slack=due - time.time(),
                         headroom=margin,
                         stretch=queue.policy.admission == "strict"):  # fmt: skip
            return None
        # Come back once the request it would delay has left the queue.
        return min(max(last_backlog.clears_in() or 0.0, MIN_RECHECK), MAX_RETRY_AFTER)

    def _backlog(
        self, queue: _Queue, workers: list[WorkerHandle], queued: int | None = None
    ) -> Backlog:
        """Rows ahead of an arriving request (`queued` of the queued ones, all of them when
        None, and batches formed but not running), the workers' throughput and when the
        soonest of them is free."""
        book, latency = self._book, queue.latency
        keys = [w.key for w in workers]
        formed = sum(book.outstanding(key) - book.running_rows(key) for key in keys)
        # The soonest-free worker's running batch: seconds predicted, seconds run so far.
        running = min(
            ((latency.predict(key, rows) or 0.0, book.running_for(key)) if rows else (0.0, 0.0)
             for key, rows in ((key, book.running_rows(key)) for key in keys)),
            key=lambda batch: max(0.0, batch[0] - batch[1]), default=(0.0, 0.0),
        )
        return Backlog(
            (queue.pending.rows if queued is None else queued) + formed,
            latency.throughput(keys, queue.policy.max_batch_size), *running,
        )

    def _seed(self, queue: _Queue, workers: list[WorkerHandle]) -> None:
        """Seed the latency model from each new worker's warm-up timings, if it offers them."""
        seeded = queue.seeded if queue.seeded is not None else set()
        queue.seeded = seeded
        for worker in workers:
            if worker.key in seeded:
                continue
            seeded.add(worker.key)
            timings = getattr(worker, "warmup_timings", None)
            if callable(timings):
                queue.latency.seed(worker.key, timings(queue.model, queue.version))

    def _full(self, queue: _Queue, message: str) -> Overloaded:
        """The error for a full queue, with the time its workers need to drain it."""
        retry_after = drain_seconds(
            queued_rows=queue.pending.rows, batch_seconds=queue.batch_seconds,
            max_batch_size=queue.policy.max_batch_size,
            workers=len(self._workers.candidates(queue.model, queue.version)),
        )
        return Overloaded(message, retry_after=retry_after)

    def _evict(self, queue: _Queue, evicted: tuple[_Pending, ...]) -> None:
        """Fail what the queue dropped to admit a request with a better claim to the room."""
        self._metrics.count_evicted(queue.model, len(evicted))
        error = self._full(queue, f"dropped from the full queue for {queue.model}/{queue.version}")
        for pending in evicted:
            pending.queued = False
            _fail(pending, error)

    def _depths(self) -> Iterator[tuple[str, str, str, int]]:
        for queue in list(self._queues.values()):
            for lane, rows in queue.pending.rows_by_lane().items():
                yield queue.model, queue.version, lane, rows

    def _pending_counts(self) -> Iterator[tuple[str, str, int]]:
        for queue in list(self._queues.values()):
            yield queue.model, queue.version, len(queue.pending) + queue.inflight

    def _loads(self) -> Iterator[tuple[str, str, int, float | None]]:
        """Per version, at scrape: rows in flight, and the wait `admission` predicts for a
        row arriving now (what the autoscaler reads)."""
        for queue in list(self._queues.values()):
            workers = self._workers.candidates(queue.model, queue.version)
            wait = self._backlog(queue, workers).clears_in() if workers else None
            yield queue.model, queue.version, queue.inflight_rows, wait

    def _pump_all(self) -> None:
        for queue in list(self._queues.values()):
            self._pump(queue)

    def _pump(self, queue: _Queue) -> None:
        while queue.pending:
            worker = self._free_worker(queue)
            if worker is None:
                return
            now = self._clock()
            decision = self._plan(queue, worker, now)
            if decision.rows == 0:
                self._arm(queue, decision.wait or 0.0)
                return
            members = self._take(queue, decision.rows, now)
            if members:
                self._launch(queue, worker, members)

    def _pump_soon(self, queue: _Queue) -> None:
        """Look at `queue` once the requests arriving in this loop turn are queued: a link
        message brings many at once, and one decision for all of them costs what one
        decision per request would, times the message's size."""
        if not queue.pump_due:
            queue.pump_due = True
            asyncio.get_running_loop().call_soon(self._pump_due, queue)

    def _pump_due(self, queue: _Queue) -> None:
        queue.pump_due = False
        self._pump(queue)

    def _plan(self, queue: _Queue, worker: WorkerHandle, now: float) -> Dispatch:
        """The batch window's decision for `worker`, from the queue and the latency model."""
        key, latency = worker.key, queue.latency
        idle = self._book.inflight(key) == 0
        behind_bulk = not idle and self._book.bulk_only(key) and queue.pending.realtime_waiting
        running = latency.predict(key, self._book.running_rows(key))
        earliest = queue.deadlines.earliest(len(queue.pending))
        return plan_batch(
            queued_rows=queue.pending.rows, oldest_wait=now - queue.pending.oldest_enqueued,
            worker_idle=idle, policy=queue.policy,
            free_in=0.0 if idle else self._book.free_in(key, running or queue.batch_seconds),
            slack=None if earliest is None else earliest - time.time(),
            predict=functools.partial(_with_margin, latency.predict, key,
                                      self._measured_margin(queue, now)),
            behind_bulk=behind_bulk,
        )

    def _free_worker(self, queue: _Queue) -> WorkerHandle | None:
        candidates = self._workers.candidates(queue.model, queue.version)
        if not candidates:
            self._await_worker(queue)
            return None
        queue.no_worker_since = None
        self._seed(queue, candidates)
        return self._book.pick(candidates, self._depth, resident=_loaded(queue))

    def _await_worker(self, queue: _Queue) -> None:
        """No worker serves this version: fail what waited past the grace period, or past its
        deadline, whichever comes first; look again when the next of those is due. A version
        that scales (`coldstart.worker_expected`) has a worker on its way: its grace is
        `cold_start_grace`, so its requests wait up to their deadlines."""
        now = self._clock()
        if queue.no_worker_since is None:
            queue.no_worker_since = now
        scales = worker_expected(self._catalog.config, queue.model, queue.version)
        grace = self._cold_grace if scales else self._grace
        for pending in queue.pending.expire(now - grace):
            pending.queued = False
            _fail(pending, Unavailable(
                f"no ready worker for {queue.model}/{queue.version} after {grace:.1f}s"
            ))
        if queue.pending:
            wait = grace - (now - queue.pending.oldest_enqueued)
            self._arm(queue, min(wait, _fail_overdue(queue.pending)))

    def _arm(self, queue: _Queue, wait: float) -> None:
        """Look at `queue` again after `wait` seconds (or sooner if already due sooner)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + max(wait, 0.0)
        if queue.timer is not None:
            if queue.timer_due <= due:
                return
            queue.timer.cancel()

        def fire() -> None:
            queue.timer = None
            self._pump(queue)

        queue.timer, queue.timer_due = loop.call_at(due, fire), due

    def _take(self, queue: _Queue, rows: int, now: float) -> list[_Pending]:
        members: list[_Pending] = []
        rows_by_tenant: dict[str, int] = {}
        wall = time.time()
        for pending in self._compatible(queue, queue.pending.take(rows, now)):
            pending.queued = False
            if pending.future.done():
                continue  # the caller gave up (deadline, disconnect)
            deadline = pending.request.deadline
            if deadline is not None and deadline <= wall:
                queue.metrics.missed("take")
                _fail(pending, DeadlineExceeded("deadline exceeded while queued"))
                continue
            self._metrics.queue_delay.observe(now - pending.enqueued)
            pending.span.set("infermesh.queue_wait_ms", round((now - pending.enqueued) * 1e3, 3))
            if not pending.attempts:  # a retried request was observed on its first dispatch
                queue.metrics.queue_duration.observe(now - pending.enqueued)
            members.append(pending)
            rows_by_tenant[pending.tenant] = rows_by_tenant.get(pending.tenant, 0) + pending.rows
        self._metrics.count_tenant_rows(queue.model, rows_by_tenant)
        return members

    @staticmethod
    def _compatible(queue: _Queue, taken: list[_Pending]) -> list[_Pending]:
        """The taken requests whose tensors join with the first one's (same non-batch
        dimensions); the others go back to the front of the queue for a batch of their own."""
        key = shape_key(taken[0].request) if taken else None
        keep: list[_Pending] = []
        back: list[_Pending] = []
        for pending in taken:
            (keep if shape_key(pending.request) == key else back).append(pending)
        for pending in reversed(back):
            queue.pending.requeue(pending)
        return keep

    def _launch(self, queue: _Queue, worker: WorkerHandle, members: list[_Pending]) -> None:
        rows = sum(m.rows for m in members)
        self._book.launched(worker.key, rows, bulk=_bulk(members))
        queue.inflight += len(members)
        queue.inflight_rows += rows
        task = asyncio.create_task(self._run(queue, worker, members))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, queue: _Queue, worker: WorkerHandle, members: list[_Pending]) -> None:
        dispatched = self._clock()
        span = batch_span(queue.model, queue.version, worker.key,
                          [(m.span, m.attempts) for m in members], sum(m.rows for m in members))
        errors: list[InfermeshError] = []

        async def attempt(piece: list[_Pending]) -> InfermeshError | None:
            error = await self._attempt(queue, worker, span, piece)
            if error is not None:
                errors.append(error)
            return error

        try:
            outcome = await bisect(members, attempt, due=self._due)
            self._settle(queue, worker.key, members, outcome)
            if outcome.splits:
                queue.metrics.splits.inc(outcome.splits)
                span.set("infermesh.batch_splits", outcome.splits)
        finally:
            span.end(errors[0] if errors else None)
            rows = sum(m.rows for m in members)
            queue.inflight -= len(members)
            queue.inflight_rows -= rows
            self._finished(queue, worker.key, dispatched, rows, bulk=_bulk(members))
            self._pump_all()

    async def _attempt(
        self, queue: _Queue, worker: WorkerHandle, span: tracing.HopSpan, piece: list[_Pending]
    ) -> InfermeshError | None:
        """Run `piece` as one batch and deliver its outputs; or return the batch's error,
        leaving its members unanswered."""
        rows = sum(m.rows for m in piece)
        try:
            # Inside the try: requests whose tensors cannot be joined fail, never hang.
            batch = build_batch(queue.model, queue.version, [m.request for m in piece])
            batch.trace = span.carrier()
            queue.metrics.batch_rows.observe(rows)
            timeout = batch_timeout([m.request.deadline for m in piece])
            called, arrived = self._clock(), self._arrivals.count
            call = asyncio.ensure_future(worker.run_batch(batch, timeout=timeout))
            forget = _cancel_when_abandoned(call, piece)
            try:
                result = await call
            finally:
                forget()
            self._timed(queue, worker.key, rows, called, arrived)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call.cancelled() and task is not None and not task.cancelling():
                return None  # every caller left (see _cancel_when_abandoned): nothing to answer
            raise
        except InfermeshError as exc:
            return exc
        except Exception as exc:  # a bug in a worker handle must not leave callers hanging
            log.exception("batch of %s/%s failed", queue.model, queue.version)
            return InternalError(f"batch failed: {type(exc).__name__}: {exc}")
        queue.metrics.executed(rows)
        self._deliver(queue, piece, result.outputs)
        span.set("infermesh.device", result.device)
        return None

    def _due(self, piece: list[_Pending]) -> list[_Pending]:
        """The members of a batch about to be (re-)run that still wait for it; fails those
        whose deadline passed (a re-run of a failed batch never runs past a deadline)."""
        wall = time.time()
        due: list[_Pending] = []
        for pending in piece:
            deadline = pending.request.deadline
            if deadline is not None and deadline <= wall:
                _fail(pending, DeadlineExceeded("deadline exceeded before the batch could run"))
            elif not pending.future.done():
                due.append(pending)
        return due

    def _settle(
        self, queue: _Queue, worker_key: str, members: list[_Pending],
        outcome: Outcome[_Pending],
    ) -> None:
        """Answer what a batch's runs left unanswered (see `bisection.lone_failure`)."""
        for piece, error in outcome.unsplit:
            if isinstance(error, Unavailable):
                self._redispatch(queue, worker_key, piece, error)
            else:
                for pending in piece:
                    _fail(pending, error)
        ran = [m for m in members if m.future.done() and not m.future.cancelled()
               and m.future.exception() is None]
        for pending, error in outcome.lone:
            _fail(pending, lone_failure(pending.request.request_id, error, others_ok=bool(ran)))

    def _timed(self, queue: _Queue, key: str, rows: int, called: float, arrived: int) -> None:
        """Feed a batch's execution time to the latency model and admission's margin, with
        the rate requests arrived at since the batch was sent (`arrived`: the arrival count
        then); export the model's error."""
        now = self._clock()
        actual = now - self._book.started(key, called)
        predicted = queue.latency.predict(key, rows)
        queue.metrics.timed(predicted, actual)
        rate = (self._arrivals.count - arrived) / max(now - called, 1e-3)
        queue.headroom.observe(predicted, actual, rate=rate, now=now)
        queue.latency.observe(key, rows, actual)

    def _finished(
        self, queue: _Queue, key: str, dispatched: float, rows: int, *, bulk: bool
    ) -> None:
        """Book a batch's end: worker load, and the version's moving batch time."""
        started = self._book.started(key, dispatched)
        done = self._book.finished(key, rows, bulk=bulk)
        queue.batch_seconds = 0.8 * queue.batch_seconds + 0.2 * (done - started)

    def _redispatch(
        self, queue: _Queue, dead: str, members: list[_Pending], error: InfermeshError
    ) -> None:
        """A worker died with the batch: re-run it once on another worker (or, with none,
        from the queue) if its members' deadlines allow; fail the others now (503)."""
        log.warning("batch of %s/%s failed on worker %s: %s", queue.model, queue.version,
                    dead, error)
        self._book.suspect(dead)
        target = self._book.pick(
            self._workers.candidates(queue.model, queue.version), 0, exclude=dead,
            resident=_loaded(queue))
        execution = queue.latency.predict(target.key if target else dead,
                                          sum(m.rows for m in members))
        wall, again = time.time(), []
        for pending in members:
            deadline = pending.request.deadline
            if pending.attempts >= 1 or self._closed:
                _fail(pending, error)
            elif deadline is not None and wall + (execution or 0.0) > deadline:
                queue.metrics.missed("redispatch")
                _fail(pending, Unavailable(
                    f"{error.message}; no time left to re-run the batch before the deadline"))
            elif not pending.future.done():
                pending.attempts += 1
                again.append(pending)
        if again and target is not None:
            self._launch(queue, target, again)  # bounded: each request is re-run once
            return
        for pending in reversed(again):
            pending.queued = True
            queue.pending.requeue(pending)
            queue.deadlines.push(pending.request.deadline, pending)

    def _deliver(self, queue: _Queue, members: list[_Pending], outputs: list[Tensor]) -> None:
        rows = [m.rows for m in members]
        pieces = [split_rows(tensor, rows) for tensor in outputs]
        wall = time.time()
        for index, pending in enumerate(members):
            if pending.future.done():
                continue
            deadline = pending.request.deadline
            if deadline is None or wall <= deadline:
                queue.metrics.goodput.inc()
            else:
                queue.metrics.missed("late")
            wanted = pending.request.outputs
            pending.future.set_result(InferResponse(
                model=queue.model, version=queue.version,
                request_id=pending.request.request_id,
                outputs=[per_output[index] for per_output in pieces
                         if wanted is None or per_output[index].name in wanted],
            ))

    async def aclose(self) -> None:
        """Stop accepting; fail what is queued; wait for batches in flight."""
        self._closed = True
        for queue in self._queues.values():
            if queue.timer is not None:
                queue.timer.cancel()
            for pending in queue.pending.drain():
                pending.queued = False
                _fail(pending, Unavailable("batcher is shutting down"))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10.0)


def _bulk(members: list[_Pending]) -> bool:
    """Whether a batch carries bulk rows only (see `policy`: realtime never waits behind one
    for the batch window)."""
    return all(m.lane == "bulk" for m in members)


def _require_rows(request: InferRequest) -> None:
    # The gateway refuses these; one that gets here anyway (over a link, a bug upstream) would
    # never leave the queue: the batch window sees 0 queued rows and re-arms itself at 0 s.
    if request.rows < 1:
        raise InvalidInput(
            f"request {request.request_id!r} has 0 rows; a request carries at least one row"
        )


def _fail_overdue(queued: Iterable[_Pending]) -> float:
    """Fail the queued requests whose deadline has passed (they stay queued, answered, until
    dispatch or the grace skips them); seconds until the next deadline (inf: none)."""
    wall, soonest = time.time(), math.inf
    for pending in queued:
        deadline = pending.request.deadline
        if deadline is None or pending.future.done():
            continue
        if deadline <= wall:
            _fail(pending, DeadlineExceeded("deadline exceeded while waiting for a worker"))
        else:
            soonest = min(soonest, deadline - wall)
    return soonest


def _still_queued(pending: _Pending) -> bool:
    return pending.queued and not pending.future.done()


def _cancel_when_abandoned(
    call: asyncio.Future[BatchResult], piece: list[_Pending]
) -> Callable[[], None]:
    """Cancel `call` once every member's caller has gone (its future cancelled: a client
    disconnected, a hop before gave up), so a batch never runs rows nobody waits for: over a
    link the cancel reaches the worker, which skips a batch it has not started. Returns what
    unhooks the watch."""
    waiting = [m.future for m in piece if not m.future.done()]
    left = len(waiting)

    def gone(future: asyncio.Future[InferResponse]) -> None:
        nonlocal left
        if future.cancelled():
            left -= 1
            if left == 0 and not call.done():
                call.cancel()

    for future in waiting:
        future.add_done_callback(gone)

    def forget() -> None:
        for future in waiting:
            future.remove_done_callback(gone)

    return forget


def _loaded(queue: _Queue) -> Callable[[WorkerHandle], bool]:
    """Whether a worker has the queue's version loaded (its batch waits for no load)."""
    return lambda worker: worker.resident(queue.model, queue.version)


def _fail(pending: _Pending, error: InfermeshError) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)


def _with_margin(
    predict: Callable[[str | None, int], float | None], key: str, margin: float, rows: int
) -> float | None:
    """`predict(key, rows)` times admission's margin: a batch is sized and sent early by the
    time it may take on this machine now, as requests are admitted (an encoder burst's
    batches ran 1.5-1.9x their prediction, and a batch sized to the line missed the 1 s
    deadline it was sized for)."""
    seconds = predict(key, rows)
    return None if seconds is None else seconds * margin
