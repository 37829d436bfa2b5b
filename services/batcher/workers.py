"""The batcher's next hop: workers, over links or in-process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from services.mesh import frames
from services.mesh.links import LinkClient
from services.mesh.peers import LinkPool
from services.mesh.types import Batch, BatchResult


class WorkerHandle(Protocol):
    """One worker instance able to run batches."""

    @property
    def key(self) -> str: ...

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult: ...


class WorkerPool(Protocol):
    """The workers that can run a (model, version) right now."""

    def candidates(self, model: str, version: str) -> list[WorkerHandle]: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


class _LinkedWorker:
    def __init__(self, link: LinkClient, instance: str) -> None:
        self._link = link
        self.key = instance

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult:
        meta, buffers = frames.encode_batch(batch)
        frame = await self._link.call(meta, buffers, timeout=timeout)
        return frames.decode_batch_result(frame.meta, frame.payload)


class LinkedWorkerPool:
    """Workers found in etcd (`endpoints/worker/*`) that list the version as loaded."""

    def __init__(self, pool: LinkPool) -> None:
        self._pool = pool
        self._handles: dict[int, _LinkedWorker] = {}

    def candidates(self, model: str, version: str) -> list[WorkerHandle]:
        wanted = f"{model}/{version}"
        found: list[WorkerHandle] = []
        for link, record in self._pool.links():
            if wanted in record.get("models", ()):
                found.append(self._handle(link, record))
        return found

    def _handle(self, link: LinkClient, record: dict[str, Any]) -> _LinkedWorker:
        handle = self._handles.get(id(link))
        if handle is None or handle._link is not link:
            handle = _LinkedWorker(link, str(record.get("instance", link.url)))
            self._handles = {
                k: h for k, h in self._handles.items() if not h._link.closed
            }
            self._handles[id(link)] = handle
        return handle

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._pool.subscribe(listener)


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
