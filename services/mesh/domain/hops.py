"""The next hops of the data plane, as interfaces.

`InferTarget` is what the gateway calls (a router) and what the router calls (a batcher);
`WorkerPool` is what the batcher dispatches batches to. Each has an in-process implementation
(the next core itself, `services.batcher.workers.LocalWorkerPool`) and a link implementation
(`services.mesh.transport.linked`); tests/contract runs the same cases against both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from services.mesh.domain.types import Batch, BatchResult, InferRequest, InferResponse


class InferTarget(Protocol):
    """Anything that answers an InferRequest: a router, a batcher, or a link to one."""

    async def infer(self, request: InferRequest) -> InferResponse: ...


class WorkerHandle(Protocol):
    """One worker instance able to run batches."""

    @property
    def key(self) -> str: ...

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult: ...

    def warmup_timings(self, model: str, version: str) -> Mapping[int, float]:
        """Seconds this worker took for a batch of each size (rows) its warm-up sweep ran, for
        (model, version): a seed for the latency model. Empty when unknown."""
        ...

    def resident(self, model: str, version: str) -> bool:
        """Whether (model, version) is loaded on this worker: False when it is served but
        its next batch would wait for its load (beyond the worker's memory budget)."""
        ...


def warmup_timings_from_record(record: Any, model: str, version: str) -> dict[int, float]:
    """The warm-up timings of (model, version) in a worker's endpoint record
    (`"warmup": {"model/version": {"rows": seconds}}`); empty when absent or malformed."""
    timings = record.get("warmup") if isinstance(record, dict) else None
    sizes = timings.get(f"{model}/{version}") if isinstance(timings, dict) else None
    if not isinstance(sizes, dict):
        return {}
    found: dict[int, float] = {}
    for rows, seconds in sizes.items():
        try:
            found[int(rows)] = float(seconds)
        except (TypeError, ValueError):
            continue
    return found


def resident_in_record(record: Any, model: str, version: str) -> bool:
    """Whether a worker's endpoint record lists (model, version) as loaded (`"resident":
    ["model/version", ...]`); a record without the list (a worker that loads everything it
    serves at start) counts every version it serves as loaded."""
    resident = record.get("resident") if isinstance(record, dict) else None
    return not isinstance(resident, list) or f"{model}/{version}" in resident


class WorkerPool(Protocol):
    """The workers that can run a (model, version) right now."""

    def candidates(self, model: str, version: str) -> list[WorkerHandle]: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


def remaining(deadline: float | None) -> float | None:
    """Seconds left until an absolute deadline (None: no deadline)."""
    return None if deadline is None else deadline - time.time()
