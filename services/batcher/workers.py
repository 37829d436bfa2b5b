"""The batcher's in-process next hop: worker cores called directly (fused mode, tests).

The protocols are in services/mesh/domain/hops.py; the link implementation is
`services.mesh.transport.linked.LinkedWorkerPool`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from services.mesh.domain.hops import WorkerHandle, WorkerPool
from services.mesh.domain.types import Batch, BatchResult

__all__ = ["LocalWorker", "LocalWorkerPool", "WorkerHandle", "WorkerPool"]


class LocalWorker(Protocol):
    """An in-process worker core (`services.worker.core.Worker`)."""

    @property
    def key(self) -> str: ...

    def is_ready(self, model: str, version: str) -> bool: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult: ...


class LocalWorkerPool:
    """In-process workers: the same core the worker service runs, called directly."""

    def __init__(self, *workers: LocalWorker) -> None:
        self._workers = workers

    def candidates(self, model: str, version: str) -> list[WorkerHandle]:
        return [w for w in self._workers if w.is_ready(model, version)]

    def subscribe(self, listener: Callable[[], None]) -> None:
        for worker in self._workers:
            worker.subscribe(listener)
