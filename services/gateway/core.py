"""The gateway core: model metadata, readiness, access and validated inference. No HTTP in here.

An inference request goes: `admit` (authenticate → model allowed → model exists → tenant rate →
tenant concurrency → model concurrency), then, inside `with admission:`, the adapter decodes the
body and calls `infer` (validate → forward). Leaving the `with` block gives the slots back,
whatever happened: an answer, an error, or a cancelled (disconnected) request.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import Callable
from types import TracebackType

from services.gateway.access import Access
from services.gateway.auth import AuthFailure, HeaderLookup
from services.gateway.metrics import GatewayMetrics
from services.gateway.overload import OverloadGuard
from services.gateway.quotas import Permit, Rejection
from services.gateway.sticky import (
    DEFAULT_STICKY_HEADERS,
    forward_sticky_headers,
    sticky_header_names,
)
from services.gateway.validation import validate_request
from services.mesh.domain import tracing
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import (
    DeadlineExceeded,
    InfermeshError,
    InvalidInput,
    Overloaded,
    QuotaExceeded,
)
from services.mesh.domain.hops import InferTarget
from services.mesh.domain.tenancy import Tenant
from services.mesh.domain.types import InferRequest, InferResponse, ModelVersion

SERVER_NAME = "infermesh"
SERVER_VERSION = "0.1.0"
MAX_EDGE_WAIT = 60.0
"""Seconds before the gateway's own arrival estimate within which an edge's `X-Request-Start`
is believed (a request that waited longer in front of the gateway is long past any deadline)."""
"""What the OIP server metadata endpoints report."""


class Admission:
    """One admitted request: its tenant and the quota slots it holds until the `with` ends."""

    __slots__ = ("_metrics", "_permit", "lane", "spec", "tenant", "version")

    def __init__(
        self, tenant: Tenant, spec: ModelVersion, *, version: str | None, permit: Permit,
        metrics: GatewayMetrics,
    ) -> None:
        self.tenant = tenant.name
        self.lane = tenant.priority_class
        self.spec = spec
        """The model version the request is validated against."""
        self.version = version
        """The version the request named (None: the rollout's choice)."""
        self._permit = permit
        self._metrics = metrics

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._permit.release()
        self._metrics.count_tenant(self.tenant, _outcome(exc))


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, InfermeshError):
        return exc.code
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"


class RequestIds:
    """Request ids for requests that bring none: 32 hex digits, a per-process random prefix (64
    bits, drawn at start and again in a forked child) then a 64-bit counter.

    Unique across processes and restarts as long as no two processes draw the same prefix
    (about n**2 / 2**65 for n processes). No `os.urandom` per request: it releases the GIL,
    and taking it back behind the worker's inference thread stalled the event loop.
    """

    def __init__(self) -> None:
        self._draw_prefix()
        os.register_at_fork(after_in_child=self._draw_prefix)

    def _draw_prefix(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()  # next() on it is atomic under the GIL

    def next(self) -> str:
        """The next id of this process."""
        return f"{self._prefix}{next(self._counter):016x}"


_REQUEST_IDS = RequestIds()


class Gateway:
    """Authenticates, enforces quotas, validates requests and hands them to the router."""

    def __init__(
        self, catalog: ModelCatalog, router: InferTarget, *, access: Access,
        metrics: GatewayMetrics | None = None, default_timeout: float = 30.0,
        sticky_headers: tuple[str, ...] = DEFAULT_STICKY_HEADERS,
        clock: Callable[[], float] = time.time, overload: OverloadGuard | None = None,
    ) -> None:
        self._catalog = catalog
        self._router = router
        self._access = access
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self._default_timeout = default_timeout
        self._sticky_headers = sticky_headers
        self._sticky_keys: frozenset[str] | None = None
        self._sticky_names: tuple[str, ...] = ()
        self._clock = clock
        self.overload = overload if overload is not None else OverloadGuard(clock=clock)
        """Refuses what the mesh cannot answer in time; knows how late this loop runs."""
        self.metrics.loop_lag.set_function(lambda: self.overload.lag)
        self._last_realtime = float("-inf")
        """`clock()` when the last realtime request (any lane but bulk) arrived."""

    @staticmethod
    def new_request_id() -> str:
        """A process-unique id as 32 hex digits, see `RequestIds` (no system call per id)."""
        return _REQUEST_IDS.next()

    def live(self) -> bool:
        return True

    def realtime_age(self) -> float:
        """Seconds since the last realtime request arrived here (inf: none yet); what a job
        beside it paces on (jobs_pacing.py)."""
        return self._clock() - self._last_realtime

    def ready(self) -> bool:
        """True when every model with a rollout has a ready worker for its primary version."""
        for rollout in self._catalog.rollouts():
            model = rollout.model
            if rollout.primary and not self._catalog.ready_workers(model, rollout.primary):
                return False
        return True

    def authorize(self, model: str, header: HeaderLookup) -> Tenant:
        """The caller's tenant, which may use `model`; Unauthenticated or PermissionDenied."""
        outcome = self._access.authorize(model, header)
        if isinstance(outcome, AuthFailure):
            self.metrics.auth_failures.labels(outcome.reason).inc()
            raise outcome.error()
        return outcome

    def admit(self, model: str, version: str | None, *, header: HeaderLookup) -> Admission:
        """Authorize the caller, check the model exists and take a request's quota.

        Use the result as `with admission:` around decoding and `infer`; raises
        Unauthenticated, PermissionDenied, NotFound or QuotaExceeded (with retry_after).
        """
        return self.admit_tenant(self.authorize(model, header), model, version)

    def admit_tenant(
        self, tenant: Tenant, model: str, version: str | None, *, cost: int = 1,
    ) -> Admission:
        """`admit` for a tenant already authorized for `model` (the job runner's way in: it
        holds no key, only the tenant a key submitted the job as); NotFound or QuotaExceeded.
        `cost`: the requests it stands for against the tenant's rate (a pack of job rows)."""
        try:
            spec = self._catalog.resolve(model, version)
        except InfermeshError as exc:
            self.metrics.count_tenant(tenant.name, exc.code)
            raise
        decision = self._access.admit(tenant, model, cost=cost)
        if isinstance(decision, Rejection):
            self.metrics.quota_rejections.labels(tenant.name, decision.limit).inc()
            self.metrics.count_tenant(tenant.name, QuotaExceeded.code)
            raise QuotaExceeded(decision.message, retry_after=decision.retry_after)
        return Admission(tenant, spec, version=version, permit=decision, metrics=self.metrics)

    def model_metadata(
        self, model: str, version: str | None, *, header: HeaderLookup
    ) -> ModelVersion:
        """The version named, or the one a request without a version is validated against."""
        self.authorize(model, header)
        return self._catalog.resolve(model, version)

    def resolve(self, model: str, version: str | None) -> ModelVersion:
        """The version named, or the rollout's default for None; NotFound."""
        return self._catalog.resolve(model, version)

    def model_versions(self, model: str) -> list[str]:
        return [v.version for v in self._catalog.versions(model)]

    def model_ready(self, model: str, version: str | None, *, header: HeaderLookup) -> bool:
        self.authorize(model, header)
        spec = self._catalog.resolve(model, version)
        return self._catalog.ready_workers(model, spec.version) > 0

    async def infer(
        self, request: InferRequest, *, admission: Admission, header: HeaderLookup | None = None,
        arrived: float | None = None,
    ) -> InferResponse:
        """Validate, stamp tenant, deadline and trace context, forward; raises InfermeshError.

        The request's span continues the caller's `traceparent` (header or gRPC metadata) when
        it sends one; the response names the trace in its `trace_id` parameter.

        `admission` is what `admit` gave for this request. `header` looks up the rollout's
        sticky key among the request's headers (or gRPC metadata) when the request's
        parameters do not carry it. `arrived` (see `arrival`) dates its deadline; by default
        the gateway's own estimate.
        """
        span = _infer_span(request.model, request.request_id, admission, header)
        try:
            response = await self._infer(request, admission, header, span, arrived)
        except BaseException as exc:
            recorded = span.end(exc)
            if isinstance(exc, InfermeshError):
                exc.trace_id = self._trace_of(span, exc, recorded)
            if isinstance(exc, DeadlineExceeded):
                self.metrics.deadline_exceeded.inc()
            raise
        span.set("infermesh.version", response.version)
        span.set("infermesh.bucket", response.parameters.get("bucket"))
        span.end()
        return response

    def trace_refusal(
        self, error: InfermeshError, *, model: str, request_id: str, admission: Admission,
        header: HeaderLookup | None = None,
    ) -> None:
        """Trace a request refused before it became an `InferRequest` (its body did not
        decode, or its tensors do not fit the signature) like any failed request: one errored
        span, and the error names its trace."""
        span = _infer_span(model, request_id, admission, header)
        error.trace_id = self._trace_of(span, error, span.end(error))

    def _trace_of(
        self, span: tracing.HopSpan, error: InfermeshError, recorded: bool
    ) -> str | None:
        """The trace id an error answer names: its span's, unless the span of this refusal was
        left unrecorded by the shedding bound (`tracing.SHED_SPANS_PER_SECOND`): then none,
        and it is counted."""
        if recorded or span.sampled or not tracing.recording() or not tracing.is_shedding(error):
            return span.trace_id
        self.metrics.untraced_refusals.inc()
        return None

    async def _infer(
        self, request: InferRequest, admission: Admission, header: HeaderLookup | None,
        span: tracing.HopSpan, arrived: float | None = None,
    ) -> InferResponse:
        request.tenant, request.lane = admission.tenant, admission.lane
        if request.lane != "bulk":
            self._last_realtime = self._clock()
        spec = admission.spec
        if (request.model, request.version) != (spec.model, admission.version):
            spec = self._catalog.resolve(request.model, request.version)
        validate_request(request, spec.signature, max_rows=spec.batching.max_batch_size)
        self._stamp_deadline(request, spec, arrived)
        if spec.batching.admission != "off":
            self._refuse_if_late(request)
        if header is not None and request.version is None:
            self._sticky_from_header(request, header)
        request.trace = span.carrier()
        response = await self._forward(request)
        if request.outputs is not None:
            wanted = set(request.outputs)
            response.outputs = [t for t in response.outputs if t.name in wanted]
        response.request_id = request.request_id
        response.parameters["trace_id"] = span.trace_id
        return response

    def _sticky_from_header(self, request: InferRequest, header: HeaderLookup) -> None:
        """Forward every header that could be a sticky key: the router, whose rollout copy
        picks the version, picks the key too (see `services.gateway.sticky`)."""
        keys = self._catalog.sticky_keys()
        if keys is not self._sticky_keys:
            self._sticky_keys = keys
            self._sticky_names = sticky_header_names(self._sticky_headers, keys)
        forward_sticky_headers(request.parameters, header, self._sticky_names)

    def deadline_after(self, seconds: float | None, arrived: float | None = None) -> float | None:
        """The deadline `seconds` after the request arrived (None for None): what an adapter
        stamps on a request for a timeout its protocol carries (X-Request-Timeout). `arrived`
        defaults to now less the loop's lag: under overload a request waits in the socket
        before its handler runs, and its client counts that wait."""
        if seconds is None:
            return None
        return (self.overload.now() if arrived is None else arrived) + seconds

    def arrival(self, edge_start: float | None) -> float:
        """When the request arrived, as well as the gateway can tell: the edge's receive time
        (`X-Request-Start`) when it is earlier than the gateway's own estimate (now less the
        loop lag) and within `MAX_EDGE_WAIT` of it; else that estimate. A start in the future,
        or from a clock far off, cannot lengthen a deadline or void it."""
        estimate = self.overload.now()
        if edge_start is None or not estimate - MAX_EDGE_WAIT <= edge_start < estimate:
            return estimate
        return edge_start

    def refuse_before_reading(self, model: str, admission: Admission, deadline: float) -> None:
        """With a deadline its transport gave (`X-Request-Timeout`, dated from the edge's
        `X-Request-Start`), refuse a request before its body is read and decoded: 504 when the
        deadline has passed already (it waited that long in front of the gateway), 503 when
        answers take longer now than it has left or its batcher would refuse it (see
        `OverloadGuard.check_remembered`). A refusal then costs HTTP parsing and access
        checks only, so shedding load takes less from the requests being served."""
        if self._clock() >= deadline:
            self.metrics.deadline_exceeded.inc()
            raise DeadlineExceeded("deadline exceeded before the gateway read the request")
        if admission.spec.batching.admission != "off":
            self._refuse_overloaded(model, admission.version, admission.tenant, admission.lane,
                                    deadline)

    def _refuse_if_late(self, request: InferRequest) -> None:
        """Overloaded (503 + Retry-After) at once if answers for the model take longer now
        than the request has left, or its batcher would refuse it: it would only cost the
        mesh work and come back a 503 or a 504."""
        assert request.deadline is not None, "stamped by _stamp_deadline"
        self._refuse_overloaded(request.model, request.version, request.tenant, request.lane,
                                request.deadline)

    def _refuse_overloaded(
        self, model: str, version: str | None, tenant: str, lane: str, deadline: float
    ) -> None:
        try:
            self.overload.check(model, deadline)
        except Overloaded:
            self.metrics.overload_refusals.inc()
            raise
        if self.overload.remembers(model):
            key = self._refusal_key(model, version, tenant, lane)
            if key is not None:
                try:
                    self.overload.check_remembered(model, key, deadline)
                except Overloaded:
                    self.metrics.remembered_refusals.inc()
                    raise

    def _refusal_key(
        self, model: str, version: str | None, tenant: str, lane: str
    ) -> tuple[str, str, str] | None:
        """(version, tenant, lane) of a request for `model` naming `version` (None: the
        rollout's choice), when a batcher refusal of one says something of another: the
        version is known here (named, or the rollout's only route), its answers are not
        cached (a cached answer is served without the batcher) and one batcher serves it
        (several queue apart). Else None: nothing is remembered or refused for it."""
        if version is None:
            try:
                routes = [r for r in self._catalog.rollout(model).routes if r.weight > 0]
            except InfermeshError:
                return None
            if len(routes) != 1:
                return None
            version = routes[0].version
        try:
            spec = self._catalog.version(model, version)
        except InfermeshError:
            return None
        if spec.cache is not None or self._catalog.batchers(model, version) != 1:
            return None
        return version, tenant, lane

    def ensure_on_time(self, deadline: float | None) -> None:
        """Raise DeadlineExceeded (counted as a miss and a late answer avoided) when `deadline`
        has passed: adapters call it last thing before sending a success, so that no 200 ever
        leaves after its deadline, however long the answer took to come back or to encode."""
        try:
            self._check_on_time(deadline)
        except DeadlineExceeded:
            self.metrics.deadline_exceeded.inc()
            raise

    def _check_on_time(self, deadline: float | None) -> None:
        if deadline is not None and self._clock() >= deadline:
            self.metrics.late_responses_avoided.inc()
            raise DeadlineExceeded("deadline exceeded: the answer came back too late")

    def _stamp_deadline(
        self, request: InferRequest, spec: ModelVersion, arrived: float | None = None
    ) -> None:
        """Set the request's deadline. The client's own limits come first, and the earliest
        of them wins: the transport's (gRPC `grpc-timeout`, REST `X-Request-Timeout`, already
        on `request.deadline`) and the OIP `timeout` parameter (seconds). A request that names
        none gets its version's `batching.default_timeout_ms`, else the gateway's default."""
        timeout = request.parameters.get("timeout")
        if timeout is not None and (
            not isinstance(timeout, int | float) or isinstance(timeout, bool)
            or not 0 < timeout < math.inf
        ):
            raise InvalidInput("parameter 'timeout': must be a positive number of seconds")
        now = self.overload.now() if arrived is None else arrived
        given = [d for d in (request.deadline, self.deadline_after(timeout, now)) if d is not None]
        if given:
            request.deadline = min(given)
        elif spec.batching.default_timeout_ms is not None:
            request.deadline = now + spec.batching.default_timeout_ms / 1000
        else:
            request.deadline = now + self._default_timeout

    async def _forward(self, request: InferRequest) -> InferResponse:
        """The router's answer, or DeadlineExceeded at the deadline even while the request
        still runs (the router is cancelled, and with it the work queued for the request)."""
        assert request.deadline is not None, "stamped by _stamp_deadline"
        left = request.deadline - self._clock()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the gateway forwarded the request")
        # A timer that cancels this task, as `asyncio.timeout` does, for a third of its cost.
        task = asyncio.current_task()
        assert task is not None, "called from a task"
        alarm, cancelling = _Alarm(task), task.cancelling()
        timer = asyncio.get_running_loop().call_later(left, alarm.ring)
        ticket = self.overload.started(request.model)
        named = request.version  # the router sets the version it picks (in this process too)
        try:
            response = await self._router.infer(request)
        except asyncio.CancelledError as exc:
            if alarm.rang and task.uncancel() <= cancelling:  # else the client left too
                raise DeadlineExceeded("deadline exceeded waiting for the model") from exc
            raise
        except Overloaded as exc:
            if exc.busy_for is not None:
                key = self._refusal_key(request.model, named, request.tenant, request.lane)
                if key is not None:
                    self.overload.remember(request.model, key, request.deadline, exc)
            raise
        else:
            if alarm.rang:  # the answer won the race: the cancel was ours, and is undone
                task.uncancel()
        finally:
            timer.cancel()
            self.overload.finished(request.model, ticket)
        self._check_on_time(request.deadline)
        return response


class _Alarm:
    """Cancels a task when the timer it is given to fires, and remembers that it did."""

    __slots__ = ("rang", "_task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self._task = task
        self.rang = False

    def ring(self) -> None:
        self.rang = True
        self._task.cancel()


def _infer_span(
    model: str, request_id: str, admission: Admission, header: HeaderLookup | None
) -> tracing.HopSpan:
    """The gateway's span of one inference request, continuing the caller's `traceparent`."""
    span = tracing.start("gateway.infer", kind=tracing.SERVER,
                         traceparent=header(tracing.TRACEPARENT) if header else None)
    span.set("infermesh.request_id", request_id)
    span.set("infermesh.model", model)
    span.set("infermesh.tenant", admission.tenant)
    return span
