"""The worker's Triton-mirrored compute histogram, over a real demo model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.types import Rollout
from services.worker.artifacts import ArtifactCache
from services.worker.core import Worker
from services.worker.demo_models import DemoModel
from services.worker.factory import backend_factory
from services.worker.metrics import WorkerMetrics
from tests.worker.test_core import batch, features, mlp_record, wait_until

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


@pytest.fixture
def config(demo_models: dict[str, DemoModel]) -> StaticConfig:
    """`mlp/1`, its record built (and its artifact hashed) before the test's loop runs."""
    return StaticConfig({
        "rollouts/mlp": Rollout.stable("mlp", "1").to_json(),
        "models/mlp/1": mlp_record(demo_models["mlp"]).to_json(),
    })


@pytest.fixture
async def worker(
    config: StaticConfig, demo_models: dict[str, DemoModel], tmp_path: Path
) -> AsyncIterator[tuple[Worker, WorkerMetrics]]:
    metrics = WorkerMetrics()
    async with aiohttp.ClientSession() as session:
        worker = Worker(
            ModelCatalog(config), models=("mlp",),
            artifacts=ArtifactCache(
                session, tmp_path / "artifacts",
                stores=[demo_models["mlp"].artifact.parent.as_uri()],
            ),
            backend_factory=backend_factory(), metrics=metrics,
        )
        yield worker, metrics
        await worker.aclose()


async def test_a_batch_run_is_observed_in_the_compute_infer_histogram(
    worker: tuple[Worker, WorkerMetrics],
) -> None:
    core, metrics = worker
    core.start()
    await wait_until(core, lambda: "mlp/1" in core.ready_versions())
    name = "infermesh_inference_compute_infer_duration_seconds"
    labels = {"model": "mlp", "version": "1"}

    await core.run_batch(batch("1", features(4)), timeout=5.0)
    await core.run_batch(batch("1", features(2)), timeout=5.0)

    assert metrics.registry.get_sample_value(f"{name}_count", labels) == 2
    total = metrics.registry.get_sample_value(f"{name}_sum", labels)
    legacy = metrics.registry.get_sample_value(
        "infermesh_worker_compute_seconds_sum", {**labels, "device": "cpu"}
    )
    assert total is not None and total > 0
    assert total == legacy  # the same measurement under Triton's name


async def test_compute_is_the_models_time_not_the_wait_for_the_inference_thread(
    worker: tuple[Worker, WorkerMetrics],
) -> None:
    """A batch that waits behind another in the inference thread is observed with its own
    run's time. The thread is held for 1 s first; the mlp's run takes well under a
    millisecond, so its observation stays under half of that wait however busy the machine
    (the wait was counted in before: at least 1 s)."""
    core, metrics = worker
    core.start()
    await wait_until(core, lambda: "mlp/1" in core.ready_versions())
    held = core._executor.submit(time.sleep, 1.0)
    await core.run_batch(batch("1", features(4)), timeout=30.0)
    assert held.done()  # the batch did wait behind it
    total = metrics.registry.get_sample_value(
        "infermesh_inference_compute_infer_duration_seconds_sum",
        {"model": "mlp", "version": "1"},
    )
    assert total is not None and 0 < total < 0.5
