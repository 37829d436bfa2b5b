"""The link implementations of the next-hop interfaces (services/mesh/domain/hops.py).

Callers: `LinkedInferTarget` sends a request over a link to a live instance found in etcd (the
gateway's router, the router's batcher); `LinkedWorkerPool` runs batches on workers over links.
Servers: `infer_handler` serves an `InferTarget` on a link; `batch_handler` serves a worker
core's `run_batch`. The in-process implementations are the cores themselves.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from services.mesh.domain.errors import InternalError, InvalidInput
from services.mesh.domain.hops import (
    InferTarget,
    WorkerHandle,
    remaining,
    resident_in_record,
    warmup_timings_from_record,
)
from services.mesh.domain.types import Batch, BatchResult, InferRequest, InferResponse
from services.mesh.transport import frames
from services.mesh.transport.links import Handler, LinkClient
from services.mesh.transport.peers import LinkPool
from services.mesh.transport.spread import WorkerShare

Q = TypeVar("Q")
A = TypeVar("A")


class LinkedInferTarget:
    """Forwards requests over links to instances of one service.

    With `affinity=True`, requests for one model go to the same instance while it lives
    (rendezvous hashing), so a batcher sees all of a model's traffic and batches it together;
    with `spread` (model, version → k, `ModelCatalog.batchers`), to the least busy of the
    model's top k instances (services/mesh/transport/spread.py).
    """

    def __init__(
        self, pool: LinkPool, *, affinity: bool = False,
        spread: Callable[[str, str | None], int] | None = None,
    ) -> None:
        self._pool = pool
        self._affinity = affinity
        self._spread = spread

    async def infer(self, request: InferRequest) -> InferResponse:
        if self._affinity:
            k = 1 if self._spread is None else self._spread(request.model, request.version)
            link = self._pool.pick_by_key(request.model, k=k)
        else:
            link = self._pool.pick()
        meta, buffers = frames.encode_request(request)
        frame = await link.call(meta, buffers, timeout=remaining(request.deadline))
        return _reply(frames.decode_response, frame.meta, frame.payload)


def _reply(decode: Callable[[dict[str, Any], memoryview], A], meta: dict[str, Any],
           payload: memoryview) -> A:
    """Decode a peer's answer. One that does not decode is the peer's fault (a bug or a
    corrupt frame), never the caller's input: an InternalError, not the decoder's 400."""
    try:
        return decode(meta, payload)
    except InvalidInput as exc:
        raise InternalError(f"malformed reply over the link: {exc}") from exc


def infer_handler(target: InferTarget) -> Handler:
    """A link handler that serves `target.infer` for `infer` frames."""
    return _serve("infer", frames.decode_request, target.infer, frames.encode_response)


def _serve(
    op: str, decode: Callable[[dict[str, Any], memoryview], Q],
    call: Callable[[Q], Awaitable[A]], encode: Callable[[A], tuple[dict[str, Any], Any]],
) -> Handler:
    """A link handler for `op` frames: decode, one call, encode; other operations refused."""

    async def handle(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
        if meta.get("op") != op:
            raise InvalidInput(f"unsupported link operation {meta.get('op')!r}")
        return encode(await call(decode(meta, payload)))

    return handle


class _LinkedWorker:
    def __init__(self, link: LinkClient, instance: str) -> None:
        self._link = link
        self.key = instance
        self.record: dict[str, Any] = {}
        """The worker's endpoint record as last seen (LinkedWorkerPool keeps it current)."""

    def warmup_timings(self, model: str, version: str) -> Mapping[int, float]:
        return warmup_timings_from_record(self.record, model, version)

    def resident(self, model: str, version: str) -> bool:
        return resident_in_record(self.record, model, version)

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult:
        if batch.deadline is None and timeout is not None:
            # The worker drops a batch it cannot start before then (it knows no timeout).
            batch = dataclasses.replace(batch, deadline=time.time() + timeout)
        meta, buffers = frames.encode_batch(batch)
        frame = await self._link.call(meta, buffers, timeout=timeout)
        return _reply(frames.decode_batch_result, frame.meta, frame.payload)


class LinkedWorkerPool:
    """Workers found in etcd (`endpoints/worker/*`) that list the version as loaded; those
    draining only while no other has it. With `share`, only this batcher's share of them
    while the model is spread over several batchers (services/mesh/transport/spread.py)."""

    def __init__(self, pool: LinkPool, *, share: WorkerShare | None = None) -> None:
        self._pool = pool
        self._share = share
        self._handles: dict[int, _LinkedWorker] = {}

    def candidates(self, model: str, version: str) -> list[WorkerHandle]:
        wanted = f"{model}/{version}"
        found: list[WorkerHandle] = []
        draining: list[WorkerHandle] = []
        for link, record in self._pool.links():
            if wanted in record.get("models", ()):
                (draining if record.get("draining") else found).append(
                    self._handle(link, record))
        # A draining worker (SIGTERM) gets new batches only while no other worker has the
        # version: it serves on until its replacement is ready, then takes nothing new.
        return self._mine(model, version, found) or draining

    def _mine(self, model: str, version: str, found: list[WorkerHandle]) -> list[WorkerHandle]:
        if self._share is None or len(found) < 2:
            return found
        mine = self._share.mine(model, version, [handle.key for handle in found])
        return found if mine is None else [handle for handle in found if handle.key in mine]

    def _handle(self, link: LinkClient, record: dict[str, Any]) -> _LinkedWorker:
        handle = self._handles.get(id(link))
        if handle is None or handle._link is not link:
            handle = _LinkedWorker(link, str(record.get("instance", link.url)))
            self._handles = {
                k: h for k, h in self._handles.items() if not h._link.closed
            }
            self._handles[id(link)] = handle
        handle.record = record  # a re-warm-up republishes the record with new timings
        return handle

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._pool.subscribe(listener)


class BatchRunner(Protocol):
    """What serves batches on a link: a worker core."""

    def run_batch(self, batch: Batch) -> Awaitable[BatchResult]: ...


def batch_handler(core: BatchRunner) -> Handler:
    """Serve `batch` frames with `core.run_batch`."""
    return _serve("batch", frames.decode_batch, core.run_batch, frames.encode_batch_result)
