"""A hot model spread over two batchers: each takes part of the traffic and runs it on its own
half of the workers, so two batchers and four workers form two independent pipelines.

Wired in one process over real links and a real etcd, each hop its real core behind its real
link server: the router's batcher target (`LinkedInferTarget` with `ModelCatalog.batchers`) →
two batchers (`LinkedWorkerPool` with a `WorkerShare` each, over their own worker links) →
four worker cores. Only the model is a fake: a backend that holds its worker's inference
thread until the test lets it go, so every worker shows a running batch at the same moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson
import pytest
from aiohttp import web

from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.hops import WorkerHandle
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    Batch,
    BatchResult,
    InferRequest,
    InferResponse,
    ModelVersion,
    Signature,
    TensorSpec,
)
from services.mesh.infra.etcd import ConfigCache, connect_client
from services.mesh.transport.linked import (
    LinkedInferTarget,
    LinkedWorkerPool,
    batch_handler,
    infer_handler,
)
from services.mesh.transport.links import Handler, LinkServer
from services.mesh.transport.peers import LinkPool
from services.mesh.transport.spread import WorkerShare, rank
from services.worker.core import Worker
from tests.credentials import CREDENTIAL
from tests.fakes import model_records
from tests.waiting import wait_for
from tests.worker.stubs import NoArtifacts

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)
WORKERS = ("w1", "w2", "w3", "w4")
BATCHERS = ("b1", "b2")
WAIT = 30.0


class HeldBackend:
    """Doubles `x`; holds its worker's inference thread until `released`."""

    device = "cpu"

    def __init__(self, released: threading.Event) -> None:
        self.running = threading.Event()
        self.released = released

    def load(self, artifact: Path) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        return {}

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.running.set()
        self.released.wait(WAIT)
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        pass


class _Noted:
    """A worker handle that notes, in its batcher's set, each worker it ran a batch on."""

    def __init__(self, handle: WorkerHandle, used: set[str]) -> None:
        self._handle = handle
        self._used = used
        self.key = handle.key

    def warmup_timings(self, model: str, version: str) -> Mapping[int, float]:
        return self._handle.warmup_timings(model, version)

    def resident(self, model: str, version: str) -> bool:
        return self._handle.resident(model, version)

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult:
        self._used.add(self.key)
        return await self._handle.run_batch(batch, timeout=timeout)


@dataclass
class Pipeline:
    """One batcher: its workers as it sees them, and what reached it and where it went."""

    name: str
    workers: LinkedWorkerPool
    arrived: int = 0
    used: set[str] = field(default_factory=set)

    def candidates(self, model: str, version: str) -> list[WorkerHandle]:
        return [_Noted(h, self.used) for h in self.workers.candidates(model, version)]

    def subscribe(self, listener: Callable[[], None]) -> None:
        self.workers.subscribe(listener)



class Counted:
    """A batcher as its link server sees it: counts the requests that reach it."""

    def __init__(self, batcher: Batcher, pipeline: Pipeline) -> None:
        self._batcher = batcher
        self._pipeline = pipeline

    async def infer(self, request: InferRequest) -> InferResponse:
        self._pipeline.arrived += 1
        return await self._batcher.infer(request)


@dataclass
class Mesh:
    target: LinkedInferTarget
    catalog: ModelCatalog
    pipelines: dict[str, Pipeline]
    backends: dict[str, HeldBackend]
    released: threading.Event
    put: Callable[[str, object], Any]


@contextlib.asynccontextmanager
async def serve_link(handler: Handler) -> AsyncIterator[str]:
    server = LinkServer(handler, name="hop", credential=CREDENTIAL)
    app = web.Application()
    app.router.add_get("/link", server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/link"
    finally:
        await server.aclose()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def loaded(backend: HeldBackend, catalog: ModelCatalog) -> AsyncIterator[Worker]:
    """A worker core running `backend`, once it has loaded m/1."""
    worker = Worker(catalog, models=("m",), artifacts=NoArtifacts(),
                    backend_factory=lambda spec: backend)
    worker.start()
    try:
        await wait_for(lambda: worker.is_ready("m", "1"), timeout=WAIT,
                       what="a worker to load m/1")
        yield worker
    finally:
        await worker.aclose()


async def opened(pool: LinkPool, instances: int) -> LinkPool:
    pool.start()
    await wait_for(lambda: len(pool.links()), lambda n: n == instances, timeout=WAIT,
                   what=f"{instances} open {pool.service} links")
    return pool


@pytest.fixture
async def mesh(etcd_url: str, etcd_prefix: str) -> AsyncIterator[Mesh]:
    released = threading.Event()
    async with contextlib.AsyncExitStack() as stack:
        etcd = connect_client(etcd_url)
        stack.push_async_callback(etcd.close)
        stack.push_async_callback(etcd.delete_prefix, etcd_prefix.encode())

        async def put(key: str, value: object) -> None:
            await etcd.put(f"{etcd_prefix}{key}".encode(), orjson.dumps(value))

        records = model_records("m", SIGNATURE, max_batch_size=2)
        records["models/m/1"]["batching"]["batchers"] = 2  # type: ignore[index]
        for key, value in records.items():
            await put(key, value)
        config = ConfigCache(etcd, etcd_prefix)
        await config.start()
        stack.push_async_callback(config.aclose)
        catalog = ModelCatalog(config)
        await wait_for(lambda: catalog.batchers("m", "1"), lambda k: k == 2, timeout=WAIT,
                       what="the catalog to see m/1 spread over 2 batchers")
        session = await stack.enter_async_context(aiohttp.ClientSession())

        backends = {name: HeldBackend(released) for name in WORKERS}
        for name, backend in backends.items():
            worker = await stack.enter_async_context(loaded(backend, catalog))
            url = await stack.enter_async_context(serve_link(batch_handler(worker)))
            await put(f"endpoints/worker/{name}", {"instance": name, "link": url,
                                                   "models": ["m/1"]})

        pipelines: dict[str, Pipeline] = {}
        for name in BATCHERS:
            links = await opened(LinkPool(session, config, "worker", credential=CREDENTIAL),
                                 len(WORKERS))
            stack.push_async_callback(links.aclose)
            share = WorkerShare(config, instance=name, batchers=catalog.batchers)
            pipeline = pipelines[name] = Pipeline(name, LinkedWorkerPool(links, share=share))
            # One batch at a time per worker: a batcher with two workers runs two at once.
            batcher = Batcher(catalog, pipeline, pipeline_depth=1, metrics=BatcherMetrics())
            batcher.start()
            stack.push_async_callback(batcher.aclose)
            url = await stack.enter_async_context(
                serve_link(infer_handler(Counted(batcher, pipeline))))
            await put(f"endpoints/batcher/{name}", {"instance": name, "link": url})

        batchers = await opened(LinkPool(session, config, "batcher", credential=CREDENTIAL),
                                len(BATCHERS))
        stack.push_async_callback(batchers.aclose)
        target = LinkedInferTarget(batchers, affinity=True, spread=catalog.batchers)
        stack.callback(released.set)  # first: the workers' threads wait on it
        yield Mesh(target, catalog, pipelines, backends, released, put)


def request(number: int) -> InferRequest:
    data = np.full((1, 2), number, dtype=np.float32)
    return InferRequest(model="m", version="1", request_id=f"r{number}",
                        inputs=[Tensor.from_array("x", data)])


async def test_two_batchers_run_the_model_on_their_own_halves_of_the_workers(
    mesh: Mesh,
) -> None:
    # Sent at once: each call is in flight before the next is placed, so they alternate.
    calls = [asyncio.ensure_future(mesh.target.infer(request(n))) for n in range(16)]
    await wait_for(lambda: sorted(n for n, b in mesh.backends.items() if b.running.is_set()),
                   lambda running: running == sorted(WORKERS), timeout=WAIT,
                   what="a batch running on every worker at once")
    first, second = (mesh.pipelines[name] for name in rank("m", BATCHERS))
    assert (first.arrived, second.arrived) == (8, 8)
    assert len(first.used) == len(second.used) == 2
    assert first.used.isdisjoint(second.used) and first.used | second.used == set(WORKERS)

    mesh.released.set()
    answers = await asyncio.gather(*calls)
    assert [a.outputs[0].array()[0, 0] for a in answers] == [2.0 * n for n in range(16)]
    assert {key for p in mesh.pipelines.values() for key in p.used} == set(WORKERS)
    assert first.used.isdisjoint(second.used)  # the rest of the traffic kept to its half


async def test_the_setting_changed_back_to_one_gathers_the_model_on_one_batcher(
    mesh: Mesh,
) -> None:
    first = mesh.pipelines[rank("m", BATCHERS)[0]]
    assert len(first.workers.candidates("m", "1")) == 2
    record = ModelVersion.from_json(
        model_records("m", SIGNATURE, max_batch_size=2)["models/m/1"]  # type: ignore[arg-type]
    )
    await mesh.put("models/m/1", record.to_json())  # batchers: 1
    await wait_for(lambda: mesh.catalog.batchers("m", "1"), lambda k: k == 1, timeout=WAIT,
                   what="the catalog to see m/1 on one batcher")
    assert sorted(w.key for w in first.workers.candidates("m", "1")) == sorted(WORKERS)
    mesh.released.set()
    answers = await asyncio.gather(*(mesh.target.infer(request(n)) for n in range(4)))
    assert len(answers) == 4 and first.arrived == 4  # k = 1: the top batcher, however busy
    assert sum(p.arrived for p in mesh.pipelines.values()) == 4
