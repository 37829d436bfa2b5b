"""Several versions per worker within a memory budget (issue 18 point 5, docs/PLACEMENT.md).

The pure policy first (services/worker/placement.py, a fake clock), then real workers: tiny
TorchScript models whose outputs are checked, and fake backends whose footprint is set by
the artifact's size (a sparse file: a load holds at least its artifact's bytes), so "a
budget for one version" does not depend on how much RSS a load happens to grow by.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import DeadlineExceeded, InvalidInput
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    Batch,
    BatchingPolicy,
    ModelVersion,
    Rollout,
    Signature,
    TensorSpec,
)
from services.mesh.infra.settings import load_settings
from services.worker import memory
from services.worker.backends.base import Backend
from services.worker.core import Worker
from services.worker.factory import backend_factory
from services.worker.metrics import WorkerMetrics
from services.worker.placement import TOLERANCE, Placement, default_budget, keep_score
from services.worker.settings import WorkerSettings
from tests.fakes import model_records

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

MB = 1 << 20
SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the pure policy ---------------------------------------------------------------------


def test_the_cheapest_idle_version_is_evicted_first() -> None:
    clock = Clock()
    placement = Placement(300, clock=clock)
    for key, load_seconds in ((("m", "hot"), 5.0), (("m", "cold"), 0.1), (("m", "idle"), 5.0)):
        placement.loaded(key, footprint=100, load_seconds=load_seconds)
    for _ in range(20):
        placement.requested(("m", "hot"))
    placement.requested(("m", "cold"))
    clock.now += 10
    placement.requested(("m", "hot"))
    # idle: never asked for (no cost to lose); cold: cheap to reload; hot: dear and in use.
    assert placement.victims(100, keep=("m", "new")) == [("m", "idle")]
    assert placement.victims(200, keep=("m", "new")) == [("m", "idle"), ("m", "cold")]
    assert placement.victims(0, keep=("m", "new")) == []


def test_least_recently_used_breaks_equal_costs() -> None:
    clock = Clock()
    placement = Placement(200, clock=clock)
    placement.loaded(("m", "a"), footprint=100, load_seconds=1.0)
    placement.loaded(("m", "b"), footprint=100, load_seconds=1.0)
    placement.requested(("m", "a"))
    clock.now += 1
    placement.requested(("m", "b"))
    clock.now += 100  # both rates decayed alike; a is idle longer
    assert placement.victims(100, keep=("m", "c")) == [("m", "a")]
    assert keep_score(load_seconds=1, request_rate=1, idle_seconds=0) > keep_score(
        load_seconds=1, request_rate=1, idle_seconds=10)
    assert keep_score(load_seconds=2, request_rate=1, idle_seconds=5) > keep_score(
        load_seconds=1, request_rate=1, idle_seconds=5)


def test_a_version_with_work_in_flight_is_never_chosen() -> None:
    placement = Placement(200, clock=Clock())
    placement.loaded(("m", "a"), footprint=100, load_seconds=0.1)
    placement.loaded(("m", "b"), footprint=100, load_seconds=9.0)
    placement.started(("m", "a"))
    assert placement.victims(100, keep=("m", "c")) == [("m", "b")]
    placement.started(("m", "b"))
    assert placement.victims(100, keep=("m", "c")) is None  # the load waits
    placement.finished(("m", "a"))
    assert placement.victims(100, keep=("m", "c")) == [("m", "a")]


def test_a_request_soon_after_an_eviction_is_a_thrash() -> None:
    clock = Clock()
    placement = Placement(100, thrash_window=60, clock=clock)
    placement.loaded(("m", "a"), footprint=100, load_seconds=1)
    placement.evicted(("m", "a"))
    clock.now += 59
    assert placement.requested(("m", "a")) is True
    assert placement.requested(("m", "a")) is False  # one thrash per eviction
    placement.loaded(("m", "a"), footprint=100, load_seconds=1)
    placement.evicted(("m", "a"))
    clock.now += 61
    assert placement.requested(("m", "a")) is False


def test_budget_arithmetic() -> None:
    placement = Placement(1000, clock=Clock())
    assert placement.limit == 1000 * (1 + TOLERANCE)
    assert placement.fits(5000), "nothing resident: a version bigger than the budget loads alone"
    placement.loaded(("m", "a"), footprint=600, load_seconds=1)
    assert placement.fits(400) and not placement.fits(401)
    # within the tolerance, evicting nothing busy: it loads; beyond it: wait
    placement.loaded(("m", "b"), footprint=300, load_seconds=1)
    placement.started(("m", "a"))
    assert placement.victims(440, keep=("m", "c")) == [("m", "b")]  # 600 + 440 <= 1050
    assert placement.victims(451, keep=("m", "c")) is None
    assert placement.estimate(("m", "c"), artifact_bytes=10) == 600  # its model's largest
    assert placement.estimate(("x", "1"), artifact_bytes=10) == 10
    assert placement.resident_bytes == 900 and placement.peak == 900
    assert default_budget(8 * MB) == 4 * MB


def test_memory_total_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:  10 kB\nMemTotal:       2048 kB\n")
    assert memory.memory_total(meminfo) == 2048 * 1024
    assert memory.memory_total(tmp_path / "absent") == 0
    assert memory.rss_bytes() > 0


@pytest.mark.parametrize(("env", "field"), [
    ({"INFERMESH_WORKER_MEMORY_BUDGET_BYTES": "-1"}, "memory_budget_bytes"),
    ({"INFERMESH_WORKER_MEMORY_BUDGET_BYTES": "lots"}, "MEMORY_BUDGET_BYTES"),
    ({"INFERMESH_WORKER_THRASH_WINDOW": "-5"}, "thrash_window"),
])
def test_bad_budget_settings_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        load_settings(WorkerSettings, "worker", env)


# --- real workers --------------------------------------------------------------------------


class FileArtifacts:
    """Each version's artifact is `paths[version]`."""

    def __init__(self, paths: Mapping[str, Path]) -> None:
        self._paths = paths

    async def fetch(self, spec: ModelVersion) -> Path:
        return self._paths[spec.version]


def torchscript_versions(tmp_path: Path) -> tuple[dict[str, Path], dict[str, torch.nn.Module]]:
    """Two tiny TorchScript models, versions "1" and "2", with different weights."""
    paths: dict[str, Path] = {}
    modules: dict[str, torch.nn.Module] = {}
    for version in ("1", "2"):
        torch.manual_seed(int(version))
        module = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh()).eval()
        paths[version] = tmp_path / f"v{version}.pt"
        torch.jit.save(torch.jit.script(module), str(paths[version]))
        modules[version] = module
    return paths, modules


def sample(worker_metrics: WorkerMetrics, name: str, version: str) -> float:
    labels = {"model": "m", "version": version}
    return worker_metrics.registry.get_sample_value(name, labels) or 0.0


async def started_worker(
    config: StaticConfig, artifacts: FileArtifacts, factory: Callable[[ModelVersion], Backend],
    *, budget: int, metrics: WorkerMetrics,
) -> Worker:
    worker = Worker(ModelCatalog(config), models=("m",), artifacts=artifacts,
                    backend_factory=factory, metrics=metrics, budget_bytes=budget)
    settled = asyncio.Event()
    expected = {f"m/{spec.version}" for spec in ModelCatalog(config).versions("m")}
    worker.subscribe(lambda: settled.set() if set(worker.ready_versions()) == expected else None)
    worker.start()
    async with asyncio.timeout(60):
        await settled.wait()
    return worker


def x_batch(version: str, array: npt.NDArray[Any], *, deadline: float | None = None) -> Batch:
    return Batch("m", version, [Tensor.from_array("x", array)], [len(array)], deadline=deadline)


async def test_a_budget_for_one_of_two_versions_serves_alternating_traffic(
    tmp_path: Path,
) -> None:
    paths, modules = await asyncio.to_thread(torchscript_versions, tmp_path)
    config = StaticConfig({
        **{f"models/m/{v}": ModelVersion(
            "m", v, SIGNATURE, f"file://{paths[v]}", "0" * 64,
            batching=BatchingPolicy(max_batch_size=4), device="cpu").to_json() for v in paths},
        "rollouts/m": Rollout.stable("m", "1").to_json(),
    })
    metrics = WorkerMetrics()
    # A load holds at least its artifact's bytes: one fits, not two.
    budget = await asyncio.to_thread(lambda: paths["1"].stat().st_size * 3 // 2)
    worker = await started_worker(config, FileArtifacts(paths), backend_factory(),
                                  budget=budget, metrics=metrics)
    try:
        assert worker.ready_versions() == ["m/1", "m/2"]
        assert worker.resident_versions() == ["m/1"], "the first loads at start, not the second"
        inputs = np.random.default_rng(3).standard_normal((3, 4), dtype=np.float32)
        for version in ("1", "2", "1", "2", "1", "2"):
            result = await worker.run_batch(x_batch(version, inputs), timeout=60)
            with torch.inference_mode():
                expected = modules[version](torch.from_numpy(inputs)).numpy()
            np.testing.assert_allclose(result.outputs[0].array(), expected, rtol=1e-5, atol=1e-6)
            assert worker.resident_versions() == [f"m/{version}"]
    finally:
        await worker.aclose()
    loads = "infermesh_worker_model_loads_total"
    evictions = "infermesh_worker_model_evictions_total"
    thrashes = "infermesh_worker_model_thrashes_total"
    assert (sample(metrics, loads, "1"), sample(metrics, loads, "2")) == (3, 3)
    assert (sample(metrics, evictions, "1"), sample(metrics, evictions, "2")) == (3, 2)
    assert (sample(metrics, thrashes, "1"), sample(metrics, thrashes, "2")) == (2, 2)
    assert metrics.registry.get_sample_value("infermesh_worker_memory_budget_bytes") == budget


class Scaler:
    """Multiplies `x` by its version number; its load and run can be held; records how many
    loads run at once."""

    device = "cpu"

    def __init__(self, factor: float, board: LoadBoard) -> None:
        self._factor = factor
        self._board = board

    def load(self, artifact: Path) -> None:
        with self._board.loading():
            self._board.load_released.wait(30)

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        with self._board.loading():
            return {1: 0.001}

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self._board.running.set()
        self._board.run_released.wait(30)
        return {"y": inputs["x"][:, :2] * self._factor}

    def unload(self) -> None:
        pass


class LoadBoard:
    """Shared by every Scaler of a test: concurrency of loads, and the gates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = 0
        self.max_concurrent = 0
        self.load_released = threading.Event()
        self.load_released.set()
        self.run_released = threading.Event()
        self.run_released.set()
        self.running = threading.Event()

    def loading(self) -> _Counted:
        return _Counted(self)

    def enter(self) -> None:
        with self._lock:
            self._now += 1
            self.max_concurrent = max(self.max_concurrent, self._now)
        time.sleep(0.002)  # widen the window in which an overlapping load would be seen

    def leave(self) -> None:
        with self._lock:
            self._now -= 1


class _Counted:
    def __init__(self, board: LoadBoard) -> None:
        self._board = board

    def __enter__(self) -> None:
        self._board.enter()

    def __exit__(self, *exc: object) -> None:
        self._board.leave()


@pytest.fixture
def board() -> LoadBoard:
    return LoadBoard()


@pytest.fixture
async def sized_worker(
    tmp_path: Path, board: LoadBoard, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Worker, WorkerMetrics]]:
    """Versions 1..n of `m`, each artifact a sparse 8 MB file; a budget for one of them."""
    count: int = getattr(request, "param", 2)
    versions = tuple(str(v) for v in range(1, count + 1))
    paths = {v: tmp_path / f"v{v}.bin" for v in versions}
    await asyncio.to_thread(sparse_files, paths.values(), 8 * MB)

    def factory(spec: ModelVersion) -> Backend:
        return Scaler(float(spec.version), board)

    metrics = WorkerMetrics()
    config = StaticConfig(model_records("m", SIGNATURE, versions=versions))
    worker = await started_worker(config, FileArtifacts(paths), factory, budget=12 * MB,
                                  metrics=metrics)
    yield worker, metrics
    board.load_released.set()
    board.run_released.set()
    await worker.aclose()


def sparse_files(paths: Iterable[Path], size: int) -> None:
    for path in paths:
        with path.open("wb") as sparse:
            sparse.truncate(size)


def ones(rows: int = 2) -> npt.NDArray[np.float32]:
    return np.ones((rows, 4), dtype=np.float32)


async def resident(worker: Worker, versions: list[str]) -> None:
    changed = asyncio.Event()
    worker.subscribe(changed.set)
    async with asyncio.timeout(60):
        while worker.resident_versions() != versions:
            await changed.wait()
            changed.clear()


async def test_a_version_with_queued_work_is_never_evicted(
    sized_worker: tuple[Worker, WorkerMetrics], board: LoadBoard
) -> None:
    worker, metrics = sized_worker
    assert worker.resident_versions() == ["m/1"]
    board.run_released.clear()
    busy = asyncio.create_task(worker.run_batch(x_batch("1", ones()), timeout=60))
    await asyncio.to_thread(board.running.wait, 30)
    queued = asyncio.create_task(worker.run_batch(x_batch("1", ones(3)), timeout=60))

    # m/2 needs m/1's room; m/1 has a batch running and one queued: the load waits.
    with pytest.raises(DeadlineExceeded, match="loading"):
        await worker.run_batch(x_batch("2", ones(), deadline=time.time() + 0.2))
    assert worker.resident_versions() == ["m/1"]
    assert sample(metrics, "infermesh_worker_model_evictions_total", "1") == 0

    board.run_released.set()
    assert (await busy).outputs[0].array().tolist() == [[1, 1]] * 2
    assert (await queued).outputs[0].array().tolist() == [[1, 1]] * 3
    await resident(worker, ["m/2"])  # the load went on past the deadline, then evicted m/1
    result = await worker.run_batch(x_batch("2", ones()), timeout=60)
    assert result.outputs[0].array().tolist() == [[2, 2]] * 2


async def test_a_load_that_cannot_finish_before_the_deadline_is_not_waited_for(
    sized_worker: tuple[Worker, WorkerMetrics], board: LoadBoard
) -> None:
    worker, metrics = sized_worker
    board.load_released.clear()
    async with asyncio.timeout(30):  # no hang: the batch gives up at its deadline
        with pytest.raises(DeadlineExceeded):
            await worker.run_batch(x_batch("2", ones(), deadline=time.time() + 0.2))
    assert metrics.registry.get_sample_value(
        "infermesh_worker_batches_expired_total", {"model": "m", "version": "2"}) == 1
    board.load_released.set()
    await resident(worker, ["m/2"])


@pytest.mark.parametrize("sized_worker", [20], indirect=True)
async def test_a_storm_of_20_cold_versions_loads_one_at_a_time(
    sized_worker: tuple[Worker, WorkerMetrics], board: LoadBoard
) -> None:
    worker, metrics = sized_worker
    assert len(worker.ready_versions()) == 20 and worker.resident_versions() == ["m/1"]
    versions = [str(v) for v in range(2, 21)]
    results = await asyncio.gather(*(
        worker.run_batch(x_batch(v, ones()), timeout=120) for v in versions))
    for version, result in zip(versions, results, strict=True):
        assert result.outputs[0].array().tolist() == [[float(version)] * 2] * 2
    assert board.max_concurrent == 1, "two loads (or warm-ups) ran at once"
    loads = sum(sample(metrics, "infermesh_worker_model_loads_total", v)
                for v in ["1", *versions])
    assert loads == 20
    placement = worker.placement
    assert placement.peak <= placement.limit, "resident bytes went past the budget"
