"""Both implementations of each next-hop interface, built around the same core.

`infer_hop` is an `InferTarget`: a real `Batcher` called directly (in-process), or the same kind
of batcher served by `infer_handler` on a real `LinkServer` and reached through a
`LinkedInferTarget` over a `LinkPool` (link). `worker_hop` is a `WorkerPool`: `LocalWorkerPool`
over a worker core (in-process), or `LinkedWorkerPool` reaching that core's `batch_handler`
(link). Behind every one sits a `ScriptedWorker`, a worker core the tests can hold, fail or stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import numpy as np
from aiohttp import web

from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.batcher.workers import LocalWorkerPool
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InvalidInput, Unavailable
from services.mesh.domain.hops import InferTarget, WorkerPool
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchResult, ModelVersion, Signature, TensorSpec
from services.mesh.transport.links import Handler, LinkServer
from services.mesh.transport.peers import LinkPool
from tests.credentials import CREDENTIAL

MODEL, VERSION = "m", "1"
REJECTION = "input 'bad': the model takes one input named 'x'"
DEVICE = "fake:0"
IMPLEMENTATIONS = ("in-process", "link")
PENDING = "infermesh_inference_pending_request_count"
WARMUP = {1: 0.001, 2: 0.0015, 4: 0.0025}
"""The scripted worker's warm-up timings (rows -> seconds); its endpoint record lists them."""


class ScriptedWorker:
    """A worker core that doubles its one input `x`, rejects any other input with InvalidInput,
    holds batches while `hold()` is in force, and crashes on `stop()` (the batches it holds fail
    with Unavailable, it stops being ready)."""

    key = "w1"

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.started = asyncio.Event()
        """Set once a batch is being computed."""
        self.cancelled = asyncio.Event()
        """Set once a batch was cancelled while being computed."""
        self.running = 0
        self._open = asyncio.Event()
        self._open.set()
        self._stopped = False
        self._listeners: list[Callable[[], None]] = []

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def stop(self) -> None:
        self._stopped = True
        self._open.set()
        for listener in self._listeners:
            listener()

    def is_ready(self, model: str, version: str) -> bool:
        return not self._stopped and (model, version) == (MODEL, VERSION)

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def warmup_timings(self, model: str, version: str) -> dict[int, float]:
        return dict(WARMUP) if (model, version) == (MODEL, VERSION) else {}

    def is_resident(self, model: str, version: str) -> bool:
        return (model, version) == (MODEL, VERSION)

    async def run_batch(self, batch: Batch, *, timeout: float | None = None) -> BatchResult:
        # Like the real worker core, it ignores `timeout`: holding a batch to its deadline is
        # the handle's job, in-process or over a link.
        if self._stopped:
            raise Unavailable(f"worker {self.key} is stopped")
        self.batches.append(batch)
        [tensor] = batch.inputs
        if tensor.name != "x":
            raise InvalidInput(REJECTION)
        self.running += 1
        self.started.set()
        try:
            await self._open.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.running -= 1
        if self._stopped:
            raise Unavailable(f"worker {self.key} stopped with the batch")
        return BatchResult([Tensor.from_array("y", tensor.array() * 2)], device=DEVICE)


@dataclass
class InferHop:
    """An `InferTarget` under test and the core behind it."""

    target: InferTarget
    batcher: Batcher
    metrics: BatcherMetrics
    worker: ScriptedWorker
    kill: Callable[[], Awaitable[None]]
    """Make the callee go away: its process shuts down (in-process) or dies (link)."""
    inflight: Callable[[], int]
    """Calls the transport still waits on (always 0 in-process)."""

    def pending(self) -> float:
        """The batcher's pending-request gauge for m/1."""
        value = self.metrics.registry.get_sample_value(
            PENDING, {"model": MODEL, "version": VERSION}
        )
        return 0.0 if value is None else value


@dataclass
class WorkerHop:
    """A `WorkerPool` under test and the worker core behind it."""

    pool: WorkerPool
    worker: ScriptedWorker
    kill: Callable[[], Awaitable[None]]
    inflight: Callable[[], int]


def batcher_over(worker: ScriptedWorker, metrics: BatcherMetrics) -> Batcher:
    signature = Signature(
        inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
    )
    spec = ModelVersion(MODEL, VERSION, signature, "file:///dev/null", "0" * 64)
    catalog = ModelCatalog(StaticConfig({f"models/{MODEL}/{VERSION}": spec.to_json()}))
    batcher = Batcher(catalog, LocalWorkerPool(worker), metrics=metrics)
    batcher.start()
    return batcher


@contextlib.asynccontextmanager
async def served(handler: Handler) -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    """A real LinkServer on 127.0.0.1: yields its URL and a kill that stops it listening and
    drops its links, as a crashed process would."""
    server = LinkServer(handler, name="callee", credential=CREDENTIAL)
    app = web.Application()
    app.router.add_get("/link", server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()

    async def kill() -> None:
        await site.stop()  # first, so that the pool cannot reconnect
        await server.aclose()
        await runner.cleanup()

    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/link", kill
    finally:
        await server.aclose()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def linked_pool(
    service: str, record: dict[str, object]
) -> AsyncIterator[LinkPool]:
    """A LinkPool over a static config listing one instance; yields once its link is open."""
    config = StaticConfig({f"endpoints/{service}/{record['instance']}": record})
    async with aiohttp.ClientSession() as session:
        pool = LinkPool(session, config, service, credential=CREDENTIAL)
        pool.start()
        try:
            opened = asyncio.Event()
            pool.subscribe(lambda: opened.set() if pool.links() else None)
            await asyncio.wait_for(opened.wait(), 5)
            yield pool
        finally:
            await pool.aclose()


def inflight_of(pool: LinkPool) -> Callable[[], int]:
    return lambda: sum(link.inflight for link, _ in pool.links())


def rows(*values: float) -> np.ndarray:
    """A (n, 2) FP32 input: one row per value."""
    return np.array([[v, v + 0.5] for v in values], dtype=np.float32)
