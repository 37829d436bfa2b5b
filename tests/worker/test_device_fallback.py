"""Device policy with CPU fallback: a version asking for CUDA on this CPU-only host, and a
simulated CUDA out-of-memory on a batch (a backend that says it runs on CUDA)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
import torch

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import ModelFailed, Unavailable
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchingPolicy, ModelVersion, Rollout, Signature
from services.mesh.infra.digests import sha256_of
from services.worker.artifacts import ArtifactCache
from services.worker.backends.base import (
    Backend,
    DeviceUnavailable,
    ModelCallFailed,
    cuda_failure,
)
from services.worker.backends.devices import choose_device
from services.worker.backends.torchscript import TorchScriptBackend
from services.worker.core import BackendFactory, Worker
from services.worker.demo_models import DemoModel
from services.worker.factory import backend_factory
from services.worker.metrics import WorkerMetrics

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")


@functools.cache
def _file_sha256(path: Path) -> str:
    return sha256_of(path)


@pytest.fixture
def mlp(demo_models: dict[str, DemoModel]) -> DemoModel:
    _file_sha256(demo_models["mlp"].artifact)  # hashing blocks: before the loop runs
    return demo_models["mlp"]


def record(model: DemoModel, *, device: str, cpu_fallback: bool) -> dict[str, Any]:
    return ModelVersion(
        "mlp", "1", Signature.from_json(model.signature), f"file://{model.artifact}",
        _file_sha256(model.artifact), batching=BatchingPolicy.from_json(model.batching),
        device=device, cpu_fallback=cpu_fallback,
    ).to_json()


class CudaThatRunsOutOfMemory:
    """A backend that says it runs on CUDA (a real CPU model inside) and, once armed, fails
    every batch as CUDA does when the device's memory is full."""

    def __init__(self, signature: Mapping[str, Any]) -> None:
        self.inner = TorchScriptBackend(signature, device_policy="cpu")
        self.armed = False
        self.unloaded = False

    @property
    def device(self) -> str:
        return "cuda:0"

    def load(self, artifact: Path) -> None:
        self.inner.load(artifact)

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        return self.inner.warm_up(max_batch_size)

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        if self.armed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.run_batch(inputs)

    def unload(self) -> None:
        self.unloaded = True
        self.inner.unload()


class Harness:
    def __init__(self, worker: Worker, config: StaticConfig, metrics: WorkerMetrics) -> None:
        self.worker, self.config, self.metrics = worker, config, metrics
        self.fakes: list[CudaThatRunsOutOfMemory] = []

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"model": "mlp", "version": "1",
                                                             **labels})

    async def publish_and_wait(self, raw: dict[str, Any]) -> None:
        """Publish the version and wait until its load has ended, loaded or not."""
        done = asyncio.Event()
        self.worker.subscribe(done.set)
        self.config.put("models/mlp/1", raw)
        self.worker.start()
        async with asyncio.timeout(30):
            await done.wait()


def factory_with_fake_cuda(harness_fakes: list[CudaThatRunsOutOfMemory]) -> BackendFactory:
    real = backend_factory()

    def build(spec: ModelVersion) -> Backend:
        if spec.device == "cpu":
            return real(spec)
        fake = CudaThatRunsOutOfMemory(spec.signature.to_json())
        harness_fakes.append(fake)
        return fake

    return build


@pytest.fixture
async def make_harness(
    mlp: DemoModel, tmp_path: Path
) -> AsyncIterator[Callable[[BackendFactory | None], Harness]]:
    async with aiohttp.ClientSession() as session:
        made: list[Worker] = []

        def make(factory: BackendFactory | None = None) -> Harness:
            config = StaticConfig({"rollouts/mlp": Rollout.stable("mlp", "1").to_json()})
            metrics = WorkerMetrics()
            fakes: list[CudaThatRunsOutOfMemory] = []
            worker = Worker(
                ModelCatalog(config), models=("mlp",), metrics=metrics,
                artifacts=ArtifactCache(session, tmp_path / "artifacts",
                                        stores=[mlp.artifact.parent.as_uri()]),
                backend_factory=factory or factory_with_fake_cuda(fakes),
            )
            made.append(worker)
            harness = Harness(worker, config, metrics)
            harness.fakes = fakes
            return harness

        yield make
        for worker in made:
            await worker.aclose()


def batch(rows: int) -> Batch:
    array = np.random.default_rng(3).standard_normal((rows, 32), dtype=np.float32)
    return Batch("mlp", "1", [Tensor.from_array("features", array)], [rows])


@no_gpu
async def test_cuda_with_cpu_fallback_serves_from_cpu_and_says_so(
    make_harness: Callable[[BackendFactory | None], Harness], mlp: DemoModel
) -> None:
    harness = make_harness(backend_factory())
    await harness.publish_and_wait(record(mlp, device="cuda", cpu_fallback=True))

    result = await harness.worker.run_batch(batch(4), timeout=10)

    assert result.device == "cpu"
    assert harness.worker.ready_versions() == ["mlp/1"]
    assert harness.worker.fallbacks()["mlp/1"].startswith("cuda unavailable")
    assert harness.sample("infermesh_worker_device_fallbacks_total",
                          reason="cuda_unavailable") == 1
    assert harness.sample("infermesh_worker_device", device="cpu") == 1


@no_gpu
async def test_cuda_without_cpu_fallback_refuses_with_a_clear_error(
    make_harness: Callable[[BackendFactory | None], Harness], mlp: DemoModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="services.worker.core")
    harness = make_harness(backend_factory())
    await harness.publish_and_wait(record(mlp, device="cuda", cpu_fallback=False))

    assert harness.worker.ready_versions() == []
    with pytest.raises(Unavailable, match="device policy 'cuda' with cpu_fallback false"):
        await harness.worker.run_batch(batch(1), timeout=10)
    errors = [r.getMessage() for r in caplog.records if "mlp/1" in r.getMessage()]
    assert len(errors) == 1 and "cpu_fallback" in errors[0]
    assert harness.sample("infermesh_worker_device_fallbacks_total",
                          reason="cuda_unavailable") is None


async def test_cuda_out_of_memory_on_a_batch_moves_the_version_to_cpu(
    make_harness: Callable[[BackendFactory | None], Harness], mlp: DemoModel
) -> None:
    harness = make_harness(None)
    await harness.publish_and_wait(record(mlp, device="cuda", cpu_fallback=True))
    assert harness.sample("infermesh_worker_device", device="cuda:0") == 1
    [cuda] = harness.fakes
    expected = cuda.inner.run_batch({"features": batch(6).inputs[0].array()})["probs"]
    cuda.armed = True

    result = await harness.worker.run_batch(batch(6), timeout=10)

    assert result.device == "cpu"
    assert np.allclose(result.outputs[0].array(), expected, rtol=1e-5, atol=1e-6)
    assert "out of memory" in harness.worker.fallbacks()["mlp/1"]
    assert harness.sample("infermesh_worker_device_fallbacks_total", reason="cuda_oom") == 1
    assert harness.sample("infermesh_worker_device", device="cuda:0") == 0
    assert harness.sample("infermesh_worker_device", device="cpu") == 1
    assert cuda.unloaded
    assert (await harness.worker.run_batch(batch(2), timeout=10)).device == "cpu"


async def test_cuda_out_of_memory_without_cpu_fallback_fails_the_batch_only(
    make_harness: Callable[[BackendFactory | None], Harness], mlp: DemoModel
) -> None:
    harness = make_harness(None)
    await harness.publish_and_wait(record(mlp, device="cuda", cpu_fallback=False))
    [cuda] = harness.fakes
    cuda.armed = True

    with pytest.raises(ModelFailed, match="out of memory"):
        await harness.worker.run_batch(batch(3), timeout=10)

    assert harness.worker.fallbacks() == {}
    assert not cuda.unloaded
    assert harness.sample("infermesh_worker_device", device="cuda:0") == 1


def test_device_choice_follows_policy_and_fallback() -> None:
    assert choose_device("cuda", cpu_fallback=False, cuda_available=True).device == "cuda"
    assert choose_device("auto", cpu_fallback=False, cuda_available=False).fallback is None
    moved = choose_device("cuda", cpu_fallback=True, cuda_available=False, why_not="no driver")
    assert (moved.device, moved.fallback) == ("cpu", moved.fallback)
    assert moved.fallback is not None and "no driver" in moved.fallback
    with pytest.raises(DeviceUnavailable, match="device policy 'cuda'"):
        choose_device("cuda", cpu_fallback=False, cuda_available=False)


def test_cuda_failures_are_told_from_the_model_s_own_errors() -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    wrapped = ModelCallFailed("OutOfMemoryError: CUDA out of memory")
    wrapped.__cause__ = oom
    assert cuda_failure(wrapped) == ("cuda_oom", "OutOfMemoryError: CUDA out of memory")
    assert cuda_failure(oom) == (
        "cuda_oom", "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB")
    assert cuda_failure(RuntimeError("CUDA error: an illegal memory access")) == (
        "cuda_error", "RuntimeError: CUDA error: an illegal memory access")
    assert cuda_failure(RuntimeError("DefaultCPUAllocator: out of memory")) is None
    assert cuda_failure(DeviceUnavailable("cuda unavailable: x")) == (
        "cuda_unavailable", "cuda unavailable: x")
    assert cuda_failure(IndexError("index 40000 is out of range")) is None


async def test_a_backend_that_chose_cpu_itself_is_reported_as_a_fallback(
    make_harness: Callable[[BackendFactory | None], Harness], mlp: DemoModel
) -> None:
    real = backend_factory()

    def build(spec: ModelVersion) -> Backend:  # like ONNX: the backend resolves its device
        backend = real(ModelVersion.from_json({**spec.to_json(), "device": "cpu"}))
        backend.device_fallback = "cuda unavailable: no CUDA execution provider"  # type: ignore[attr-defined]
        return backend

    harness = make_harness(build)
    await harness.publish_and_wait(record(mlp, device="cuda", cpu_fallback=True))

    assert harness.worker.fallbacks() == {"mlp/1": "cuda unavailable: no CUDA execution provider"}
    assert harness.sample("infermesh_worker_device_fallbacks_total",
                          reason="cuda_unavailable") == 1
