"""In-process fakes for the batcher's core tests: workers, a worker pool, config, requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from services.batcher.core import Batcher
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InfermeshError, InvalidInput, LinkClosed
from services.mesh.domain.hops import WorkerHandle
from services.mesh.domain.tenancy import Tenant
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    Batch,
    BatchingPolicy,
    BatchResult,
    InferRequest,
    InferResponse,
    ModelVersion,
    Signature,
    TensorSpec,
)

MODEL, VERSION = "m", "1"
SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)

BatcherFactory = Callable[..., Batcher]


class FakeWorker:
    """Echoes each batch's inputs as outputs; can hold batches at a gate or raise."""

    def __init__(self, key: str = "w1") -> None:
        self.key = key
        self.batches: list[Batch] = []
        self.arrivals: asyncio.Queue[Batch] = asyncio.Queue()
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: list[Exception] = []
        self.loaded = True
        """What `resident` answers: False for a worker that would load the version first."""

    def hold(self) -> None:
        """Make batches wait (after arriving) until `release()`."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def step(self) -> None:
        """Let the batches waiting now finish; hold the ones arriving later."""
        self.gate.set()
        self.gate.clear()

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult:
        self.batches.append(batch)
        self.arrivals.put_nowait(batch)
        if self.failures:
            raise self.failures.pop(0)
        await self.gate.wait()
        return BatchResult([Tensor("y", t.datatype, t.shape, bytes(t.data)) for t in batch.inputs])

    async def next_batch(self) -> Batch:
        async with asyncio.timeout(5):
            return await self.arrivals.get()

    def warmup_timings(self, model: str, version: str) -> dict[int, float]:
        return {}

    def resident(self, model: str, version: str) -> bool:
        return self.loaded


class RejectingWorker(FakeWorker):
    """Like `FakeWorker`, but fails every batch that holds a negative value (a marked request),
    as a model call fails a whole batch over one token id past its vocabulary; with
    `everything`, fails every batch (a broken model). Failing batches wait at the gate too."""

    def __init__(
        self, key: str = "w1", *, error: Callable[[], InfermeshError] | None = None,
        everything: bool = False,
    ) -> None:
        super().__init__(key)
        self.error = error or (lambda: InvalidInput("the model rejected the input"))
        self.everything = everything

    def rejects(self, batch: Batch) -> bool:
        return self.everything or any(bool((t.array() < 0).any()) for t in batch.inputs)

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult:
        if not self.rejects(batch):
            return await super().run_batch(batch, timeout=timeout)
        self.batches.append(batch)
        self.arrivals.put_nowait(batch)
        await self.gate.wait()
        raise self.error()


class FakePool:
    """The workers serving `m/1`, changeable at run time like etcd endpoints."""

    def __init__(self, *workers: FakeWorker) -> None:
        self.workers = list(workers)
        self._listeners: list[Callable[[], None]] = []

    def candidates(self, model: str, version: str) -> list[WorkerHandle]:
        return list(self.workers) if (model, version) == (MODEL, VERSION) else []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def add(self, worker: FakeWorker) -> None:
        self.workers.append(worker)
        for listener in self._listeners:
            listener()


def catalog_with(
    policy: BatchingPolicy, *, tenant_weights: dict[str, float] | None = None
) -> ModelCatalog:
    """A catalog of `m/1` under `policy`, over a config that also holds tenant records."""
    spec = ModelVersion(MODEL, VERSION, SIGNATURE, "file:///dev/null", "0" * 64, batching=policy)
    config = StaticConfig({f"models/{MODEL}/{VERSION}": spec.to_json()})
    for name, weight in (tenant_weights or {}).items():
        tenant = Tenant(name, rate=1000.0, burst=1000, max_concurrency=1000, weight=weight)
        config.put(f"tenants/{name}", tenant.to_json())
    return ModelCatalog(config)


def request(
    value: float, *, rows: int = 1, deadline: float | None = None, tenant: str = "anonymous",
    lane: str = "realtime",
) -> InferRequest:
    data = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + value
    return InferRequest(
        model=MODEL, version=VERSION, request_id=f"r{value}",
        inputs=[Tensor.from_array("x", data)], deadline=deadline, tenant=tenant, lane=lane,
    )


async def submit_all(
    batcher: Batcher, requests: list[InferRequest]
) -> list[asyncio.Task[InferResponse]]:
    """Start one task per request; return once every request is in the batcher's queue
    (or was refused)."""
    queued = asyncio.Event()
    started = 0

    async def one(req: InferRequest) -> InferResponse:
        nonlocal started
        started += 1
        if started == len(requests):
            queued.set()
        # infer() enqueues synchronously, before its first suspension.
        return await batcher.infer(req)

    tasks = [asyncio.create_task(one(r)) for r in requests]
    await queued.wait()
    return tasks


async def results(tasks: list[asyncio.Task[InferResponse]]) -> list[InferResponse]:
    async with asyncio.timeout(5):
        return await asyncio.gather(*tasks)


async def errors_of(tasks: list[asyncio.Task[InferResponse]]) -> list[BaseException | None]:
    async with asyncio.timeout(5):
        done = await asyncio.gather(*tasks, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in done]


class TimedWorker(FakeWorker):
    """A worker of known speed: a batch of n rows takes `per_row * n + fixed` seconds, one
    batch at a time (pipelined batches wait their turn, as on a device). With `dead`, every
    batch fails with `LinkClosed` once it has arrived and passed the gate (a worker killed
    mid-batch). `warmup` are the timings it reports for the warm-up sweep."""

    def __init__(
        self, key: str = "w1", *, per_row: float = 0.001, fixed: float = 0.002,
        warmup: dict[int, float] | None = None,
    ) -> None:
        super().__init__(key)
        self.per_row, self.fixed = per_row, fixed
        self.warmup = warmup or {}
        self.dead = False
        self.rows_run = 0
        self._device = asyncio.Lock()

    def warmup_timings(self, model: str, version: str) -> dict[int, float]:
        return dict(self.warmup)

    async def run_batch(self, batch: Batch, *, timeout: float | None) -> BatchResult:
        self.batches.append(batch)
        self.arrivals.put_nowait(batch)
        await self.gate.wait()
        if self.dead:
            raise LinkClosed(f"worker {self.key} went away")
        async with self._device:
            # A load pattern (the model's compute time), not a wait for something to happen.
            await asyncio.sleep(self.per_row * sum(batch.rows) + self.fixed)
        self.rows_run += sum(batch.rows)
        return BatchResult([Tensor("y", t.datatype, t.shape, bytes(t.data)) for t in batch.inputs])
