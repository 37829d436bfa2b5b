"""A client that disconnects cancels its queued work at every hop: its rows never reach a worker.

The data plane here is wired in one process over real links, each hop its real core behind
its real link server: gateway (REST on the runner every service uses, which cancels a handler
whose client closed its connection) → router → batcher → worker. So the cancellation takes the
path it takes between `infermesh up`'s processes: the gateway's handler is cancelled, its link
call sends a CANCEL frame, the router's handler task is cancelled, its call to the batcher sends
one too, the batcher's handler is cancelled and its queued request with it. Only the model is a
fake: a backend that holds the worker's inference thread until the test lets it go, and the
worker's row counter (`infermesh_worker_rows_total`) says which rows reached the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy.typing as npt
import pytest
from aiohttp import web

from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    Signature,
    TensorSpec,
)
from services.mesh.infra.runtime import app_runner, bind
from services.mesh.transport.linked import (
    LinkedInferTarget,
    LinkedWorkerPool,
    batch_handler,
    infer_handler,
)
from services.mesh.transport.links import Handler, LinkServer
from services.mesh.transport.peers import LinkPool
from services.router.core import Router
from services.worker.core import Worker
from services.worker.metrics import WorkerMetrics
from tests.credentials import CREDENTIAL
from tests.fakes import model_records
from tests.waiting import wait_for
from tests.worker.stubs import NoArtifacts

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)
ROWS = "infermesh_worker_rows_total"
WAIT = 30.0


class HeldBackend:
    """Doubles `x`; holds the inference thread while not `released`; records rows it ran."""

    device = "cpu"

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.running = threading.Event()
        self.released = threading.Event()

    def load(self, artifact: Path) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        return {}

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.ran.append(len(inputs["x"]))
        self.running.set()
        self.released.wait(WAIT)
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        pass


class Watched:
    """The batcher as its link server sees it: notes each request that reaches it and each
    one cancelled there (what the CANCEL frame from the router does)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.arrived: set[str] = set()
        self.cancelled: set[str] = set()
        self.changed = asyncio.Event()

    async def infer(self, request: InferRequest) -> InferResponse:
        self.arrived.add(request.request_id)
        self.changed.set()
        try:
            return await self._batcher.infer(request)
        except asyncio.CancelledError:
            self.cancelled.add(request.request_id)
            self.changed.set()
            raise


@dataclass
class Mesh:
    url: str
    backend: HeldBackend
    batcher: Watched
    worker_links: LinkPool
    worker_metrics: WorkerMetrics

    def rows_run(self) -> float:
        labels = {"model": "m", "version": "1", "device": "cpu"}
        return self.worker_metrics.registry.get_sample_value(ROWS, labels) or 0.0

    def batches_on_worker(self) -> int:
        return sum(link.inflight for link, _ in self.worker_links.links())


@contextlib.asynccontextmanager
async def serve_link(handler: Handler) -> AsyncIterator[str]:
    server = LinkServer(handler, name="hop", credential=CREDENTIAL)
    app = web.Application()
    app.router.add_get("/link", server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/link"
    finally:
        await server.aclose()
        await runner.cleanup()


async def opened(pool: LinkPool) -> LinkPool:
    ready = asyncio.Event()
    pool.subscribe(lambda: ready.set() if pool.links() else None)
    pool.start()
    async with asyncio.timeout(WAIT):
        await ready.wait()
    return pool


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    config = StaticConfig(model_records("m", SIGNATURE, max_batch_size=8))
    catalog = ModelCatalog(config)
    backend = HeldBackend()
    worker_metrics = WorkerMetrics()
    worker = Worker(catalog, models=("m",), artifacts=NoArtifacts(),
                    backend_factory=lambda spec: backend, metrics=worker_metrics)
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        stack.push_async_callback(worker.aclose)
        stack.callback(backend.released.set)
        worker.start()
        await wait_for(lambda: worker.is_ready("m", "1"), bool, timeout=WAIT,
                       what="the worker to load m/1")
        worker_url = await stack.enter_async_context(serve_link(batch_handler(worker)))
        config.put("endpoints/worker/w1",
                   {"instance": "w1", "link": worker_url, "models": ["m/1"]})
        worker_links = await opened(LinkPool(session, config, "worker", credential=CREDENTIAL))
        stack.push_async_callback(worker_links.aclose)
        # Two batches at most on the worker: one running, the next waiting for the thread.
        batcher = Batcher(catalog, LinkedWorkerPool(worker_links), pipeline_depth=2,
                          metrics=BatcherMetrics())
        batcher.start()
        stack.push_async_callback(batcher.aclose)
        watched = Watched(batcher)
        batcher_url = await stack.enter_async_context(serve_link(infer_handler(watched)))
        config.put("endpoints/batcher/b1", {"instance": "b1", "link": batcher_url})
        batcher_links = await opened(LinkPool(session, config, "batcher", credential=CREDENTIAL))
        stack.push_async_callback(batcher_links.aclose)
        router = Router(catalog, LinkedInferTarget(batcher_links, affinity=True))
        stack.push_async_callback(router.aclose)
        router_url = await stack.enter_async_context(serve_link(infer_handler(router)))
        config.put("endpoints/router/r1", {"instance": "r1", "link": router_url})
        router_links = await opened(LinkPool(session, config, "router", credential=CREDENTIAL))
        stack.push_async_callback(router_links.aclose)
        gateway = Gateway(catalog, LinkedInferTarget(router_links),
                          access=Access(config, auth=False))
        sock = bind("127.0.0.1", 0)
        stack.callback(sock.close)
        runner = app_runner(create_app(gateway), drain_timeout=1.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        yield Mesh(f"http://{host}:{port}", backend, watched, worker_links, worker_metrics)


async def post(url: str, request_id: str, rows: int) -> int:
    """POST one request of `rows` rows on its own connection; the status."""
    body = {"id": request_id, "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": [1.0] * (2 * rows)}
    ]}
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/v2/models/m/infer", json=body
    ) as response:
        await response.read()
        return response.status


async def until(mesh: Mesh, condition: Callable[[], bool]) -> None:
    """Wait, woken by the batcher's notes, until `condition()` holds."""
    async with asyncio.timeout(WAIT):
        while not condition():
            mesh.batcher.changed.clear()
            await mesh.batcher.changed.wait()


async def disconnect(mesh: Mesh, client: asyncio.Task[int], request_id: str) -> None:
    """Close the client's connection; wait until the cancellation has reached the batcher."""
    client.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client
    await until(mesh, lambda: request_id in mesh.batcher.cancelled)


async def test_a_request_disconnected_while_queued_never_reaches_the_worker(mesh: Mesh) -> None:
    first = asyncio.create_task(post(mesh.url, "first", 1))
    await asyncio.to_thread(mesh.backend.running.wait, WAIT)  # the slow batch holds the worker
    second = asyncio.create_task(post(mesh.url, "second", 1))
    await wait_for(mesh.batches_on_worker, lambda batches: batches == 2, timeout=WAIT,
                   what="the second batch to wait on the worker (the pipeline is full)")
    gone = asyncio.create_task(post(mesh.url, "gone", 3))
    await until(mesh, lambda: "gone" in mesh.batcher.arrived)
    await disconnect(mesh, gone, "gone")

    mesh.backend.released.set()
    assert list(await asyncio.wait_for(asyncio.gather(first, second), WAIT)) == [200, 200]
    # Queues are first come, first served: once a later request is answered, 'gone' has been
    # dispatched or skipped.
    assert await post(mesh.url, "later", 1) == 200
    assert mesh.rows_run() == 3, "the disconnected request's 3 rows reached the worker"
    assert sorted(mesh.backend.ran) == [1, 1, 1]


async def test_a_request_disconnected_while_its_batch_waits_on_the_worker_never_runs(
    mesh: Mesh,
) -> None:
    first = asyncio.create_task(post(mesh.url, "first", 1))
    await asyncio.to_thread(mesh.backend.running.wait, WAIT)
    gone = asyncio.create_task(post(mesh.url, "gone", 3))
    await wait_for(mesh.batches_on_worker, lambda batches: batches == 2, timeout=WAIT,
                   what="'gone' to wait on the worker behind the slow batch")
    await disconnect(mesh, gone, "gone")
    try:
        # 10 s: a prompt cancellation takes milliseconds; this bounds the expected failure.
        await wait_for(mesh.batches_on_worker, lambda batches: batches == 1, timeout=10,
                       what="the batcher to call off the batch nobody waits for")
    finally:
        mesh.backend.released.set()
        status = await asyncio.wait_for(first, WAIT)
    assert status == 200
    assert await post(mesh.url, "later", 1) == 200
    assert mesh.rows_run() == 2, "the disconnected request's 3 rows reached the worker"
