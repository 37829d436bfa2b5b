"""A worker drops a batch whose deadline passed before it could start: the model never runs it.

In process the deadline comes as the batch's `deadline` or the call's `timeout`; over a link
the calling end stamps the call's timeout on the batch, which the frame carries.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from services.mesh.domain.errors import DeadlineExceeded
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, Signature, TensorSpec
from services.mesh.transport.linked import LinkedWorkerPool, batch_handler
from services.worker.core import Worker
from tests.contract.hops import linked_pool, served
from tests.waiting import wait_for
from tests.worker.stubs import ready_worker

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)
EXPIRED = "infermesh_worker_batches_expired_total"
MISSED = "infermesh_deadline_exceeded_total"


class HeldBackend:
    """Doubles `x`; records each batch it runs; holds the inference thread while `held`."""

    device = "cpu"

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.running = threading.Event()
        self.released = threading.Event()
        self.released.set()

    def load(self, artifact: Path) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        return {}

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.ran.append(len(inputs["x"]))
        self.running.set()
        self.released.wait(30)
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        pass


@pytest.fixture
def backend() -> HeldBackend:
    return HeldBackend()


@pytest.fixture
async def worker(backend: HeldBackend) -> AsyncIterator[Worker]:
    worker = await ready_worker(backend, SIGNATURE)
    yield worker
    backend.released.set()
    await worker.aclose()


def batch(rows: int, *, deadline: float | None = None) -> Batch:
    x = Tensor.from_array("x", np.ones((rows, 2), dtype=np.float32))
    return Batch("m", "1", [x], [1] * rows, deadline=deadline)


def sample(worker: Worker, name: str, labels: dict[str, str]) -> float:
    return worker._metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_batch_past_its_deadline_is_not_run(
    worker: Worker, backend: HeldBackend
) -> None:
    with pytest.raises(DeadlineExceeded):
        await worker.run_batch(batch(3, deadline=time.time() - 0.001))
    with pytest.raises(DeadlineExceeded):
        await worker.run_batch(batch(2), timeout=-0.001)
    assert backend.ran == []
    assert sample(worker, EXPIRED, {"model": "m", "version": "1"}) == 2
    assert sample(worker, MISSED, {"hop": "worker"}) == 5  # the members of both batches
    result = await worker.run_batch(batch(1, deadline=time.time() + 30))
    assert backend.ran == [1] and result.outputs[0].name == "y"


async def test_a_batch_whose_deadline_passes_behind_another_is_not_run(
    worker: Worker, backend: HeldBackend
) -> None:
    backend.released.clear()
    slow = asyncio.create_task(worker.run_batch(batch(4)))
    await asyncio.to_thread(backend.running.wait, 30)
    deadline = time.time() + 0.05
    queued = asyncio.create_task(worker.run_batch(batch(2, deadline=deadline)))
    await wait_for(time.time, lambda now: now > deadline, timeout=30,
                   what="the queued batch's deadline to pass while the slow one runs")
    backend.released.set()
    await slow
    with pytest.raises(DeadlineExceeded):
        await queued
    assert backend.ran == [4], "the expired batch reached the model"


async def test_the_batch_deadline_crosses_a_link(worker: Worker, backend: HeldBackend) -> None:
    async with served(batch_handler(worker)) as (url, _), linked_pool(
        "worker", {"instance": "w1", "link": url, "models": ["m/1"]}
    ) as pool:
        [handle] = LinkedWorkerPool(pool).candidates("m", "1")
        with pytest.raises(DeadlineExceeded):
            await handle.run_batch(batch(2, deadline=time.time() - 0.001), timeout=None)
        assert sample(worker, EXPIRED, {"model": "m", "version": "1"}) == 1
        await handle.run_batch(batch(1, deadline=time.time() + 30), timeout=None)
    assert backend.ran == [1]


async def test_over_a_link_a_batch_given_up_on_is_not_run(
    worker: Worker, backend: HeldBackend
) -> None:
    backend.released.clear()
    serve, given_up = batch_handler(worker), asyncio.Event()

    async def watched(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
        try:
            return await serve(meta, payload)
        except asyncio.CancelledError:  # the caller's cancel reached the worker
            given_up.set()
            raise

    async with served(watched) as (url, _), linked_pool(
        "worker", {"instance": "w1", "link": url, "models": ["m/1"]}
    ) as pool:
        [handle] = LinkedWorkerPool(pool).candidates("m", "1")
        slow = asyncio.create_task(handle.run_batch(batch(4), timeout=None))
        await asyncio.to_thread(backend.running.wait, 30)
        with pytest.raises(DeadlineExceeded):
            await handle.run_batch(batch(2), timeout=0.05)  # the caller gives up at 50 ms
        # The cancel crosses the link after the caller's timeout: on a busy machine it reached
        # the worker after the slow batch ended, and the inference thread ran [4, 2, 1].
        async with asyncio.timeout(30):
            await given_up.wait()
        backend.released.set()
        await slow
        # One inference thread, first come first served: once a later batch is back, the
        # given-up one has been run or dropped.
        await handle.run_batch(batch(1), timeout=None)
    assert backend.ran == [4, 1], "the batch nobody waited for reached the model"
