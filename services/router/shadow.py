"""Shadow mirroring: copies of served requests sent to shadow versions, off the response path.

A mirror starts once the primary has answered, so the client's response is never delayed,
altered or failed by it. Mirrors are bounded per router (beyond the bound they are dropped and
counted), go to the batcher in the `shadow` lane, and a shadow version without a ready worker
is dropped rather than queued. When a mirror answers, the first output present in both answers
is compared (argmax agreement per row, mean absolute difference) into the shadow metrics, and
the answer goes to the prediction log as a shadow row under the primary request's id.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.hops import InferTarget
from services.mesh.domain.predictions import PredictionRecorder, policy_of
from services.mesh.domain.tensors import DTYPES, Tensor, element_count
from services.mesh.domain.types import InferRequest, InferResponse, Rollout
from services.router.metrics import RouterMetrics
from services.router.policy import shadow_targets

log = logging.getLogger(__name__)

INLINE_ELEMENTS = 1 << 16
"""Outputs up to this many elements are compared on the event loop; larger ones in a thread."""


@dataclass(frozen=True, slots=True)
class Agreement:
    """How a shadow's output compares with the primary's."""

    rows: int
    argmax_agreements: int
    mean_abs_diff: float


def compare_outputs(primary: list[Tensor], shadow: list[Tensor]) -> Agreement | None:
    """Compare the first output name present in both; None when there is nothing comparable
    (no common name, BYTES, different shapes, empty tensors or malformed data)."""
    by_name = {tensor.name: tensor for tensor in shadow}
    for expected in primary:
        got = by_name.get(expected.name)
        if got is not None:
            return _compare(expected, got)
    return None


def _compare(expected: Tensor, got: Tensor) -> Agreement | None:
    if expected.shape != got.shape or element_count(expected.shape) == 0:
        return None
    if expected.datatype not in DTYPES or got.datatype not in DTYPES:
        return None  # BYTES
    try:
        left, right = _rows(expected), _rows(got)
    except ValueError:
        return None  # data size does not match the shape
    agreements = int(np.count_nonzero(left.argmax(axis=-1) == right.argmax(axis=-1)))
    diff = float(np.abs(left.astype(np.float64) - right.astype(np.float64)).mean())
    return Agreement(left.shape[0], agreements, diff)


def _rows(tensor: Tensor) -> np.ndarray:
    """The tensor as a 2-d array: every dim but the last flattened into rows."""
    array = np.frombuffer(tensor.data, dtype=DTYPES[tensor.datatype])
    last = tensor.shape[-1] if tensor.shape else 1
    return array.reshape(element_count(tensor.shape) // last, last)


SHADOW_SUFFIX = ".shadow"
"""Appended to the request id of a mirror."""


def shadow_request(request: InferRequest, version: str) -> InferRequest:
    """A copy of `request` for a shadow version, sharing its (immutable) input tensors."""
    return InferRequest(
        model=request.model, inputs=request.inputs,
        request_id=f"{request.request_id}{SHADOW_SUFFIX}",
        version=version, tenant=request.tenant, deadline=request.deadline, lane="shadow",
        outputs=request.outputs, parameters={**request.parameters, "shadow": True},
        trace=request.trace,
    )


class ShadowMirror:
    """Sends mirrors through the batcher, at most `max_inflight` at a time."""

    def __init__(
        self, catalog: ModelCatalog, batcher: InferTarget, metrics: RouterMetrics, *,
        max_inflight: int, prediction_log: PredictionRecorder | None = None,
    ) -> None:
        self._catalog = catalog
        self._batcher = batcher
        self._metrics = metrics
        self._predictions = prediction_log
        self._max_inflight = max_inflight
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def inflight(self) -> int:
        """Mirrors sent and not yet answered."""
        return len(self._tasks)

    def start(
        self, request: InferRequest, rollout: Rollout, *, served: str, primary: list[Tensor]
    ) -> None:
        """Mirror `request` (served by `served` with outputs `primary`) to its shadow versions."""
        for version in shadow_targets(rollout, request.request_id):
            if version != served:
                self._launch(shadow_request(request, version), served, primary)

    def _launch(self, request: InferRequest, served: str, primary: list[Tensor]) -> None:
        assert request.version is not None
        stats = self._metrics.shadow(request.model, request.version)
        if (
            self._closed or len(self._tasks) >= self._max_inflight
            or self._catalog.ready_workers(request.model, request.version) == 0
        ):
            stats.dropped.inc()
            return
        task = asyncio.create_task(
            self._mirror(request, served, primary), name=f"shadow-{request.request_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(self, request: InferRequest, served: str, primary: list[Tensor]) -> None:
        assert request.version is not None
        stats = self._metrics.shadow(request.model, request.version)
        sent, started = time.time(), time.perf_counter()
        try:
            response = await self._batcher.infer(request)
        except Exception as exc:
            stats.failure.inc()
            log.debug("shadow %s of %s failed: %r", request.version, request.model, exc)
            return
        stats.success.inc()
        if self._predictions is not None:
            self._log_prediction(self._predictions, request, response, sent, started)
        if sum(element_count(t.shape) for t in primary) > INLINE_ELEMENTS:
            agreement = await asyncio.to_thread(compare_outputs, primary, response.outputs)
        else:
            agreement = compare_outputs(primary, response.outputs)
        if agreement is not None:
            self._record(request.model, served, request.version, agreement)

    def _log_prediction(
        self, predictions: PredictionRecorder, request: InferRequest, response: InferResponse,
        sent: float, started: float,
    ) -> None:
        predictions.record(
            request, response, received=sent, latency=time.perf_counter() - started,
            policy=policy_of(self._catalog, request.model, response.version), shadow=True,
            request_id=request.request_id.removesuffix(SHADOW_SUFFIX),
        )

    def _record(self, model: str, primary: str, shadow: str, agreement: Agreement) -> None:
        stats = self._metrics.comparison(model, primary, shadow)
        stats.comparisons.inc(agreement.rows)
        stats.agreements.inc(agreement.argmax_agreements)
        if math.isfinite(agreement.mean_abs_diff):
            stats.mean_abs_diff.observe(agreement.mean_abs_diff)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait (up to `timeout`) for the mirrors in flight to finish."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def aclose(self) -> None:
        """Cancel the mirrors in flight and wait for them; later mirrors are dropped."""
        self._closed = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
