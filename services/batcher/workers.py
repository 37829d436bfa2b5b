"""The batcher's in-process next hop: worker cores called directly (fused mode, tests).

The protocols are in services/mesh/domain/hops.py; the link implementation is
`services.mesh.transport.linked.LinkedWorkerPool`. Both hold a batch to its `timeout`: a worker
core computes until done, so the in-process handle stops waiting at the deadline just as a link
call does (tests/contract runs the same cases against both). Both surface the worker's own
errors (`InvalidInput` for a rejected input, `ModelFailed`) by type, and anything else as an
`InternalError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from services.mesh.domain.errors import DeadlineExceeded, InfermeshError, InternalError
from services.mesh.domain.hops import WorkerHandle, WorkerPool
from services.mesh.domain.types import Batch, BatchResult

__all__ = ["LocalWorker", "LocalWorkerPool", "WorkerHandle", "WorkerPool"]

log = logging.getLogger(__name__)


class LocalWorker(Protocol):
    """An in-process worker core (`services.worker.core.Worker`)."""

    @property
    def key(self) -> str: ...

    def is_ready(self, model: str, version: str) -> bool: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult: ...

    def warmup_timings(self, model: str, version: str) -> Mapping[int, float]: ...

    def is_resident(self, model: str, version: str) -> bool: ...


class _LocalHandle:
    """A worker core as a `WorkerHandle`: gives up on a batch at its deadline."""

    def __init__(self, worker: LocalWorker) -> None:
        self._worker = worker

    @property
    def key(self) -> str:
        return self._worker.key

    def warmup_timings(self, model: str, version: str) -> Mapping[int, float]:
        return self._worker.warmup_timings(model, version)

    def resident(self, model: str, version: str) -> bool:
        return self._worker.is_resident(model, version)

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult:
        try:
            return await self._run_batch(batch, timeout)
        except InfermeshError:
            raise
        except Exception as exc:
            # What a link answers for a call that raised: the error tree, never the raw text.
            log.exception("worker %s failed a batch of %s/%s", self.key, batch.model,
                          batch.version)
            raise InternalError(f"worker {self.key} failed: {type(exc).__name__}") from exc

    async def _run_batch(self, batch: Batch, timeout: float | None) -> BatchResult:
        if timeout is None:
            return await self._worker.run_batch(batch, timeout=None)
        if timeout <= 0:
            raise DeadlineExceeded(f"deadline exceeded before calling worker {self.key}")
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await self._worker.run_batch(batch, timeout=timeout)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            raise DeadlineExceeded(f"deadline exceeded waiting for worker {self.key}") from exc


class LocalWorkerPool:
    """In-process workers: the same core the worker service runs, called directly."""

    def __init__(self, *workers: LocalWorker) -> None:
        self._handles = [(worker, _LocalHandle(worker)) for worker in workers]

    def candidates(self, model: str, version: str) -> list[WorkerHandle]:
        return [handle for worker, handle in self._handles if worker.is_ready(model, version)]

    def subscribe(self, listener: Callable[[], None]) -> None:
        for worker, _ in self._handles:
            worker.subscribe(listener)
