"""The next hops of the data plane, as interfaces.

`InferTarget` is what the gateway calls (a router) and what the router calls (a batcher);
`WorkerPool` is what the batcher dispatches batches to. Each has an in-process implementation
(the next core itself, `services.batcher.workers.LocalWorkerPool`) and a link implementation
(`services.mesh.transport.linked`); tests/contract runs the same cases against both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from services.mesh.domain.types import Batch, BatchResult, InferRequest, InferResponse


class InferTarget(Protocol):
    """Anything that answers an InferRequest: a router, a batcher, or a link to one."""

    async def infer(self, request: InferRequest) -> InferResponse: ...


class WorkerHandle(Protocol):
    """One worker instance able to run batches."""

    @property
    def key(self) -> str: ...

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult: ...


class WorkerPool(Protocol):
    """The workers that can run a (model, version) right now."""

    def candidates(self, model: str, version: str) -> list[WorkerHandle]: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


def remaining(deadline: float | None) -> float | None:
    """Seconds left until an absolute deadline (None: no deadline)."""
    return None if deadline is None else deadline - time.time()
