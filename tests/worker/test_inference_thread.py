"""The worker's inference thread (services/worker/inference_thread.py): calls run in order in
one thread; a long call that yields lets the calls queued behind it run in between; and a
worker warming up a new version serves the versions already loaded meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, ModelVersion, Signature, TensorSpec
from services.worker.backends.base import Backend, timed_sweep
from services.worker.core import Worker
from services.worker.inference_thread import InferenceThread, between_steps
from tests.fakes import model_records
from tests.worker.stubs import NoArtifacts

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)
SPIN_CAP_S = 20.0
"""How long the slow warm-up below keeps stepping while waiting for the other version's batch:
without yielding that batch waits behind the whole warm-up, which gives up only then."""


@pytest.fixture
def thread() -> Iterator[InferenceThread]:
    executor = InferenceThread("test-infer")
    yield executor
    executor.shutdown(wait=True)


def test_calls_run_in_order_in_one_thread(thread: InferenceThread) -> None:
    seen: list[tuple[int, int]] = []

    def record(i: int) -> None:
        seen.append((i, threading.get_ident()))

    futures = [thread.submit(record, i) for i in range(50)]
    for future in futures:
        future.result(timeout=30)
    assert [i for i, _ in seen] == list(range(50))
    assert len({ident for _, ident in seen}) == 1


def test_a_yielding_call_runs_the_calls_queued_behind_it_between_its_steps(
    thread: InferenceThread,
) -> None:
    order: list[str] = []
    queued = threading.Event()

    def long_call() -> None:
        with thread.yielding():
            order.append("step 1")
            assert queued.wait(30)
            between_steps()
            order.append("step 2")

    first = thread.submit(long_call)
    second = thread.submit(order.append, "queued call")
    queued.set()
    first.result(timeout=30)
    second.result(timeout=30)
    assert order == ["step 1", "queued call", "step 2"]


def test_a_call_run_between_steps_does_not_yield_in_turn(thread: InferenceThread) -> None:
    order: list[str] = []
    queued = threading.Event()

    def nested() -> None:
        order.append("nested")
        between_steps()  # must not run "last" inside "nested"
        order.append("nested done")

    def long_call() -> None:
        with thread.yielding():
            assert queued.wait(30)
            between_steps()
            order.append("long done")

    futures = [thread.submit(long_call), thread.submit(nested),
               thread.submit(order.append, "last")]
    queued.set()
    for future in futures:
        future.result(timeout=30)
    assert order == ["nested", "nested done", "last", "long done"]


def test_errors_reach_the_caller_and_nothing_runs_after_shutdown() -> None:
    executor = InferenceThread("test-infer")
    with pytest.raises(ZeroDivisionError):
        executor.submit(lambda: 1 / 0).result(timeout=30)
    between_steps()  # outside the thread: nothing to run, no error
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        executor.submit(print)


class Board:
    """What the fake backends share: whether version 1 has run a batch, and what version 2's
    warm-up saw."""

    def __init__(self) -> None:
        self.v1_ran = threading.Event()
        self.v2_warming = threading.Event()
        self.v1_ran_while_v2_warmed: bool | None = None


class Fake:
    """Doubles its input. Version 2's warm-up keeps sweeping (1 ms steps) until version 1 has
    run a batch, for at most SPIN_CAP_S, and records whether it saw one."""

    device = "cpu"

    def __init__(self, version: str, board: Board) -> None:
        self._version, self._board = version, board

    def load(self, artifact: Path) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        if self._version != "2":
            return {1: 0.001}
        board, cap = self._board, time.monotonic() + SPIN_CAP_S
        board.v2_warming.set()
        while not board.v1_ran.is_set() and time.monotonic() < cap:
            timed_sweep(lambda rows: time.sleep(0.001), [1])
        board.v1_ran_while_v2_warmed = board.v1_ran.is_set()
        return {1: 0.001}

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        if self._version == "1":
            self._board.v1_ran.set()
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        pass


async def wait_ready(worker: Worker, version: str) -> None:
    changed = asyncio.Event()
    worker.subscribe(changed.set)
    async with asyncio.timeout(60):
        while f"m/{version}" not in worker.ready_versions():
            await changed.wait()
            changed.clear()


async def test_a_version_warming_up_does_not_hold_up_the_versions_already_serving() -> None:
    board = Board()

    def factory(spec: ModelVersion) -> Backend:
        return Fake(spec.version, board)

    records = model_records("m", SIGNATURE, versions=("1", "2"))
    config = StaticConfig({k: v for k, v in records.items() if k != "models/m/2"})
    worker = Worker(ModelCatalog(config), models=("m",), artifacts=NoArtifacts(),
                    backend_factory=factory)
    worker.start()
    try:
        await wait_ready(worker, "1")
        config.put("models/m/2", records["models/m/2"])
        assert await asyncio.to_thread(board.v2_warming.wait, 30)
        x = np.ones((1, 2), dtype=np.float32)
        result = await worker.run_batch(Batch("m", "1", [Tensor.from_array("x", x)], [1]),
                                        timeout=60)
        assert result.outputs[0].array().tolist() == [[2.0, 2.0]]
        await wait_ready(worker, "2")
        assert board.v1_ran_while_v2_warmed, "version 1's batch waited for 2's whole warm-up"
    finally:
        await worker.aclose()
