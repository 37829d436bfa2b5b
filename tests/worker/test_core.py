"""The worker core over a static catalog with a real demo TorchScript artifact."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import Unavailable
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchingPolicy, ModelVersion, Rollout, Signature
from services.mesh.infra.digests import sha256_of
from services.worker.artifacts import ArtifactCache
from services.worker.core import Worker
from services.worker.demo_models import DemoModel
from services.worker.factory import backend_factory

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


@functools.cache
def _file_sha256(path: Path) -> str:
    return sha256_of(path)


@pytest.fixture(autouse=True)
def _artifact_hashed(mlp: DemoModel) -> None:
    """Hash the artifact before the test's event loop runs (hashing blocks)."""
    _file_sha256(mlp.artifact)


def mlp_record(model: DemoModel, version: str = "1", *, sha256: str | None = None) -> ModelVersion:
    return ModelVersion(
        "mlp", version, Signature.from_json(model.signature), f"file://{model.artifact}",
        sha256 or _file_sha256(model.artifact), batching=BatchingPolicy.from_json(model.batching),
        device="cpu",
    )


@pytest.fixture
def mlp(demo_models: dict[str, DemoModel]) -> DemoModel:
    return demo_models["mlp"]


@pytest.fixture
def config() -> StaticConfig:
    return StaticConfig({"rollouts/mlp": Rollout.stable("mlp", "1").to_json()})


@pytest.fixture
async def worker(config: StaticConfig, mlp: DemoModel, tmp_path: Path) -> AsyncIterator[Worker]:
    async with aiohttp.ClientSession() as session:
        worker = Worker(
            ModelCatalog(config), models=("mlp",),
            artifacts=ArtifactCache(
                session, tmp_path / "artifacts", stores=[mlp.artifact.parent.as_uri()]
            ),
            backend_factory=backend_factory(),
        )
        yield worker
        await worker.aclose()


async def wait_until(worker: Worker, predicate: Callable[[], bool]) -> None:
    """Wait, woken by the worker's own notifications, until `predicate()` holds."""
    changed = asyncio.Event()
    worker.subscribe(changed.set)
    async with asyncio.timeout(30):
        while not predicate():
            await changed.wait()
            changed.clear()


def features(rows: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((rows, 32), dtype=np.float32)


def batch(version: str, array: np.ndarray) -> Batch:
    return Batch("mlp", version, [Tensor.from_array("features", array)], [len(array)])


async def test_loads_the_registered_version(
    worker: Worker, config: StaticConfig, mlp: DemoModel
) -> None:
    config.put("models/mlp/1", mlp_record(mlp).to_json())
    worker.start()
    await wait_until(worker, lambda: "mlp/1" in worker.ready_versions())
    assert worker.ready_versions() == ["mlp/1"]


async def test_run_batch_matches_the_torchscript_model(
    worker: Worker, config: StaticConfig, mlp: DemoModel
) -> None:
    config.put("models/mlp/1", mlp_record(mlp).to_json())
    worker.start()
    await wait_until(worker, lambda: "mlp/1" in worker.ready_versions())

    inputs = features(5)
    result = await worker.run_batch(batch("1", inputs), timeout=5.0)

    [probs] = result.outputs
    assert (probs.name, probs.datatype, probs.shape) == ("probs", "FP32", (5, 2))
    module = torch.jit.load(str(mlp.artifact))  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        expected = module(torch.from_numpy(inputs)).numpy()
    assert np.allclose(probs.array(), expected, rtol=1e-5, atol=1e-6)
    assert result.device == "cpu"


async def test_an_artifact_with_the_wrong_sha256_is_never_loaded(
    worker: Worker, config: StaticConfig, mlp: DemoModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="services.worker.core")
    config.put("models/mlp/1", mlp_record(mlp, sha256="f" * 64).to_json())
    attempts = asyncio.Event()
    worker.subscribe(attempts.set)  # the worker notifies after each load, failed or not
    worker.start()
    async with asyncio.timeout(30):
        await attempts.wait()
    assert worker.ready_versions() == []
    assert any("mlp/1" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)

    with pytest.raises(Unavailable):
        await worker.run_batch(batch("1", features(1)), timeout=5.0)


async def test_a_corrected_sha256_is_loaded(
    worker: Worker, config: StaticConfig, mlp: DemoModel
) -> None:
    config.put("models/mlp/1", mlp_record(mlp, sha256="f" * 64).to_json())
    attempts = asyncio.Event()
    worker.subscribe(attempts.set)
    worker.start()
    async with asyncio.timeout(30):
        await attempts.wait()
    assert worker.ready_versions() == []

    config.put("models/mlp/1", mlp_record(mlp).to_json())
    await wait_until(worker, lambda: "mlp/1" in worker.ready_versions())


async def test_an_unknown_version_is_unavailable(worker: Worker) -> None:
    worker.start()
    with pytest.raises(Unavailable, match="mlp/9"):
        await worker.run_batch(batch("9", features(1)), timeout=5.0)


async def test_listeners_hear_of_a_version_published_later(
    worker: Worker, config: StaticConfig, mlp: DemoModel
) -> None:
    config.put("models/mlp/1", mlp_record(mlp).to_json())
    worker.start()
    await wait_until(worker, lambda: "mlp/1" in worker.ready_versions())

    heard = asyncio.Event()
    worker.subscribe(heard.set)
    config.put("models/mlp/2", mlp_record(mlp, "2").to_json())
    async with asyncio.timeout(30):
        await heard.wait()
    await wait_until(worker, lambda: "mlp/2" in worker.ready_versions())
    assert worker.ready_versions() == ["mlp/1", "mlp/2"]


async def test_a_model_version_selector_serves_only_that_version(
    config: StaticConfig, mlp: DemoModel, tmp_path: Path
) -> None:
    config.put("models/mlp/1", mlp_record(mlp).to_json())
    config.put("models/mlp/2", mlp_record(mlp, "2").to_json())
    async with aiohttp.ClientSession() as session:
        worker = Worker(
            ModelCatalog(config), models=("mlp/2",),
            artifacts=ArtifactCache(
                session, tmp_path / "artifacts", stores=[mlp.artifact.parent.as_uri()]
            ),
            backend_factory=backend_factory(),
        )
        try:
            worker.start()
            await wait_until(worker, lambda: "mlp/2" in worker.ready_versions())
            config.put("models/mlp/3", mlp_record(mlp, "3").to_json())
            assert worker.ready_versions() == ["mlp/2"]
            with pytest.raises(Unavailable):
                await worker.run_batch(batch("1", features(1)), timeout=5.0)
        finally:
            await worker.aclose()


async def test_a_model_selector_leaves_out_dedicated_versions_its_own_worker_serves(
    config: StaticConfig, mlp: DemoModel, tmp_path: Path
) -> None:
    def record(version: str, placement: str) -> dict[str, object]:
        return {**mlp_record(mlp, version).to_json(), "worker": placement}

    config.put("models/mlp/1", record("1", "shared"))
    config.put("models/mlp/2", record("2", "dedicated"))
    async with aiohttp.ClientSession() as session:
        artifacts = ArtifactCache(session, tmp_path / "artifacts",
                                  stores=[mlp.artifact.parent.as_uri()])
        shared = Worker(ModelCatalog(config), models=("mlp",), artifacts=artifacts,
                        backend_factory=backend_factory())
        own = Worker(ModelCatalog(config), models=("mlp/2",), artifacts=artifacts,
                     backend_factory=backend_factory())
        try:
            shared.start()
            own.start()
            await wait_until(own, lambda: own.ready_versions() == ["mlp/2"])
            await wait_until(shared, lambda: "mlp/1" in shared.ready_versions())
            # Registered later, while the shared worker runs: loads are serialised in
            # catalog order, so mlp/4 ready means mlp/3 was passed over, not still loading.
            config.put("models/mlp/3", record("3", "dedicated"))
            config.put("models/mlp/4", record("4", "shared"))
            await wait_until(shared, lambda: "mlp/4" in shared.ready_versions())
            assert shared.ready_versions() == ["mlp/1", "mlp/4"]
            with pytest.raises(Unavailable):
                await shared.run_batch(batch("2", features(1)), timeout=5.0)
            assert shared.is_resident("mlp", "1") and not own.is_resident("mlp", "1")
        finally:
            await shared.aclose()
            await own.aclose()
