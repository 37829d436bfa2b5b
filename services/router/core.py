"""The router core: resolves the version of each request and forwards it. No HTTP in here."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable

from services.mesh.domain import tracing
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import DeadlineExceeded, InfermeshError, Unavailable
from services.mesh.domain.features import FeatureFiller
from services.mesh.domain.hops import InferTarget
from services.mesh.domain.predictions import PredictionRecorder, policy_of
from services.mesh.domain.signatures import request_misfit, require_fit
from services.mesh.domain.types import InferRequest, InferResponse, Rollout
from services.router.cache import PredictionCache
from services.router.metrics import CacheMetrics, RouterMetrics, VersionStats
from services.router.policy import Choice, choose_version
from services.router.shadow import ShadowMirror


class Router:
    """Chooses a version from the rollout record (unless pinned) and forwards to a batcher.

    With `features`, inputs the version fills from the online store are added once the version
    is chosen (`services.router.features`). Requests routed by the rollout are mirrored to its
    shadow versions after they are served (see `shadow`); every primary request is counted and
    timed in `metrics`. Successful answers, primary and shadow, go to `prediction_log` when
    there is one (the caller owns it).
    """

    def __init__(
        self, catalog: ModelCatalog, batcher: InferTarget, *,
        metrics: RouterMetrics | None = None, shadow_max_inflight: int = 64,
        prediction_log: PredictionRecorder | None = None, features: FeatureFiller | None = None,
        cache: PredictionCache | None = None,
    ) -> None:
        self._catalog = catalog
        self._features = features
        self._batcher = batcher
        self.metrics = metrics or RouterMetrics()
        self._predictions = prediction_log
        self._mirror = ShadowMirror(
            catalog, batcher, self.metrics, max_inflight=shadow_max_inflight,
            prediction_log=prediction_log,
        )
        self.cache = cache or PredictionCache(catalog, CacheMetrics(self.metrics.registry))
        """Answers of versions whose record opts in (services/router/cache.py)."""
        self._closed = False

    async def infer(self, request: InferRequest) -> InferResponse:
        """Route and forward one request; the response names the version that served."""
        started = time.perf_counter()
        if self._closed:
            raise Unavailable("router is closed")
        span = tracing.start("router.route", request.trace)
        try:
            response = await self._infer(request, span, started)
        except BaseException as exc:
            span.end(exc)
            raise
        span.set("infermesh.version", response.version)
        span.set("infermesh.bucket", response.parameters.get("bucket"))
        span.set("infermesh.rollout_epoch", response.parameters.get("rollout_epoch"))
        span.set("infermesh.fallback", response.parameters.get("fallback"))
        span.end()
        return response

    async def _infer(
        self, request: InferRequest, span: tracing.HopSpan, started: float
    ) -> InferResponse:
        try:
            routed = self._route(request)
        except InfermeshError as exc:
            self.metrics.unrouted(request.model, exc, time.perf_counter() - started)
            raise
        version = str(request.version)
        try:  # the version's feature inputs the caller did not send, from the online store
            filled = None if self._features is None else await self._features.fill(
                request, self._catalog.version(request.model, version))
        except InfermeshError as exc:
            self.metrics.unrouted(request.model, exc, time.perf_counter() - started)
            raise
        request.trace = span.carrier()
        stats = self.metrics.version(request.model, version)
        try:
            response = await self._forward(request, stats, started)
        except Unavailable as exc:
            routed = self._fall_back(request, routed, exc)
            stats = self.metrics.version(request.model, str(request.version))
            response = await self._forward(request, stats, started)
        if routed is not None:
            self._annotate(request, response, *routed)
        if response.version != version:
            stats = self.metrics.version(request.model, response.version)
        stats.succeeded(time.perf_counter() - started)
        if filled is not None:  # statuses in the answer and, from there, in the prediction log
            response.parameters["features"] = filled.statuses
            if filled.degraded:
                response.parameters["degraded"] = True
        if self._predictions is not None:
            durable = self._log_prediction(self._predictions, request, response, started)
            if durable is not None:
                await durable  # on the log's local disk before the answer leaves (issue 13)
        return response

    def _log_prediction(
        self, predictions: PredictionRecorder, request: InferRequest, response: InferResponse,
        started: float,
    ) -> Awaitable[None] | None:
        """Hand a served request to the prediction log; what it returns is done once the
        prediction is durable (one journal write per group of answers)."""
        latency = time.perf_counter() - started
        return predictions.record(
            request, response, received=time.time() - latency, latency=latency,
            policy=policy_of(self._catalog, request.model, response.version),
        )

    def _route(self, request: InferRequest) -> tuple[Rollout, Choice] | None:
        """Set the request's version: the rollout's choice, or check the pinned one."""
        if request.version is not None:
            self._catalog.version(request.model, request.version)
            return None
        rollout = self._catalog.rollout(request.model)
        choice = choose_version(
            rollout, self._sticky_value(request, rollout.sticky_key),
            is_ready=lambda v: self._catalog.ready_workers(request.model, v) > 0,
        )
        require_fit(request, self._catalog.version(request.model, choice.version))
        request.version, request.bucket = choice.version, choice.bucket
        if choice.fallback:
            self.metrics.fallback(request.model, choice.routed, choice.version)
        return rollout, choice

    async def _forward(
        self, request: InferRequest, stats: VersionStats, started: float
    ) -> InferResponse:
        """The batcher's answer; an expired request is dropped here, never forwarded."""
        try:
            if request.deadline is not None and time.time() >= request.deadline:
                raise DeadlineExceeded("deadline exceeded before the router forwarded it")
            return await self.cache.serve(request, self._batcher.infer)
        except asyncio.CancelledError:
            raise  # the caller left: not the version's failure (the rollout guard reads these)
        except BaseException as exc:
            stats.failed(exc, time.perf_counter() - started)
            if isinstance(exc, DeadlineExceeded):
                self.metrics.deadline_exceeded.inc()
            raise

    def _fall_back(
        self, request: InferRequest, routed: tuple[Rollout, Choice] | None, exc: Unavailable
    ) -> tuple[Rollout, Choice]:
        """Retarget a routed request whose version turned out unavailable (its worker went
        away after the catalog last said ready) to the rollout's fallback, once; else re-raise.
        """
        if routed is None:
            raise exc
        rollout, choice = routed
        fallback = rollout.fallback
        if fallback is None or fallback == request.version or choice.fallback or not (
            self._catalog.ready_workers(request.model, fallback)
        ):
            raise exc
        if request_misfit(request, self._catalog.version(request.model, fallback).signature):
            raise exc  # the fallback cannot run this request: the routed version's error stands
        self.metrics.fallback(request.model, str(request.version), fallback)
        request.version = fallback
        return rollout, dataclasses.replace(choice, version=fallback, fallback=True,
                                            routed=choice.version)

    def _annotate(
        self, request: InferRequest, response: InferResponse, rollout: Rollout, choice: Choice
    ) -> None:
        """Name the bucket and epoch in the response; mirror it to the shadow versions."""
        response.parameters["bucket"] = choice.bucket
        response.parameters["rollout_epoch"] = rollout.epoch
        if choice.fallback:
            response.parameters["fallback"] = True
        if rollout.shadow:
            self._mirror.start(request, rollout, served=response.version,
                               primary=response.outputs)

    @staticmethod
    def _sticky_value(request: InferRequest, sticky_key: str | None) -> str:
        if sticky_key:
            value = request.parameters.get(sticky_key)
            if value is None:  # the gateway forwards headers under their lower-cased names
                value = request.parameters.get(sticky_key.lower())
            if value is not None:
                return str(value)
        return request.request_id

    @property
    def shadows_inflight(self) -> int:
        """Shadow mirrors sent and not yet answered."""
        return self._mirror.inflight

    async def drain(self, timeout: float | None = None) -> None:
        """Wait (up to `timeout`) for the shadow mirrors in flight to finish."""
        await self._mirror.drain(timeout)

    async def aclose(self) -> None:
        """Refuse new requests; cancel the shadow mirrors in flight and wait for them."""
        self._closed = True
        await self._mirror.aclose()
        await self.cache.aclose()
