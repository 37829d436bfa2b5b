"""Warm-up timings: the sweep measures every size it runs, the worker publishes them with its
ready versions, and a version whose max_batch_size grows is re-warmed while it serves."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchingPolicy, ModelVersion, Rollout, Signature
from services.mesh.infra.digests import sha256_of
from services.worker.backends.base import timed_sweep, warmup_sizes
from services.worker.demo_models import DemoModel
from services.worker.settings import WorkerSettings
from services.worker.wiring import WorkerService, build_worker

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


def test_the_sweep_sizes_cover_one_to_the_max() -> None:
    assert warmup_sizes(1) == [1]
    assert warmup_sizes(8) == [1, 2, 3, 4, 7, 8]
    assert warmup_sizes(64) == [1, 2, 3, 4, 8, 16, 32, 63, 64]


def test_the_sweep_times_every_size_by_the_median_of_the_timed_runs() -> None:
    now = [0.0]
    # Per size: the untimed first pass stalls (a JIT specialising), then three timed runs of
    # which one is an outlier; the median ignores both.
    durations = {1: [5.0, 0.010, 0.011, 0.900], 4: [5.0, 0.040, 0.900, 0.041]}
    calls: list[int] = []

    def run(rows: int) -> None:
        calls.append(rows)
        now[0] += durations[rows][calls.count(rows) - 1]

    timings = timed_sweep(run, [1, 4], clock=lambda: now[0])
    assert calls == [1, 4] * 4  # whole sweeps, so each size meets the others in between
    assert timings == pytest.approx({1: 0.011, 4: 0.041})


def _record(model: DemoModel, sha256: str, max_batch_size: int) -> dict[str, Any]:
    batching = BatchingPolicy.from_json({**model.batching, "max_batch_size": max_batch_size})
    return ModelVersion(
        "mlp", "1", Signature.from_json(model.signature), f"file://{model.artifact}", sha256,
        batching=batching, device="cpu",
    ).to_json()


@pytest.fixture
def sha256(demo_models: dict[str, DemoModel]) -> str:
    return sha256_of(demo_models["mlp"].artifact)  # before the test's loop runs: hashing blocks


class Published:
    """What the worker published to its endpoint record, in order."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, Any]] = []
        self.changed = asyncio.Event()

    def models(self, ready: list[str]) -> None:
        self.updates.append(("models", ready))
        self.changed.set()

    def warmup(self, timings: dict[str, dict[str, float]]) -> None:
        self.updates.append(("warmup", timings))

    async def until(self, predicate: Any) -> dict[str, dict[str, float]]:
        """The warm-up timings published with the first models update that satisfies
        `predicate(timings)`."""
        async with asyncio.timeout(60):
            while True:
                for (kind, timings), (after, _) in zip(
                    self.updates, self.updates[1:], strict=False
                ):
                    if kind == "warmup" and after == "models" and predicate(timings):
                        return dict(timings)
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def service(
    tmp_path: Path, demo_models: dict[str, DemoModel], sha256: str
) -> AsyncIterator[tuple[WorkerService, StaticConfig, Published]]:
    config = StaticConfig({
        "rollouts/mlp": Rollout.stable("mlp", "1").to_json(),
        "models/mlp/1": _record(demo_models["mlp"], sha256, 8),
    })
    published = Published()
    settings = WorkerSettings(
        models=("mlp",), cache_dir=str(tmp_path / "cache"),
        artifact_stores=(demo_models["mlp"].artifact.parent.as_uri(),),
    )
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        worker = await build_worker(
            settings, stack, catalog=ModelCatalog(config), session=session,
            publish_models=published.models, publish_warmup=published.warmup,
        )
        yield worker, config, published


async def test_the_worker_publishes_a_timing_for_every_size_with_its_ready_versions(
    service: tuple[WorkerService, StaticConfig, Published],
) -> None:
    worker, _, published = service
    timings = await published.until(lambda t: "mlp/1" in t)
    # Published before the version is listed ready: whoever sees it ready sees its timings.
    assert [kind for kind, _ in published.updates[:2]] == ["warmup", "models"]
    assert published.updates[1][1] == ["mlp/1"]
    assert sorted(map(int, timings["mlp/1"])) == warmup_sizes(8)
    assert all(math.isfinite(took) and took > 0 for took in timings["mlp/1"].values())
    assert worker.core.warmup_timings("mlp", "1") == {
        int(rows): seconds for rows, seconds in timings["mlp/1"].items()
    }
    assert worker.core.warmup_timings("mlp", "2") == {}


async def test_a_bigger_max_batch_size_is_warmed_in_the_background_while_serving(
    service: tuple[WorkerService, StaticConfig, Published], demo_models: dict[str, DemoModel],
    sha256: str,
) -> None:
    worker, config, published = service
    await published.until(lambda t: "mlp/1" in t)
    config.put("models/mlp/1", _record(demo_models["mlp"], sha256, 64))
    assert worker.core.is_ready("mlp", "1")  # never taken out of service for the re-warm
    rows = np.zeros((40, 32), dtype=np.float32)
    result = await worker.core.run_batch(
        Batch("mlp", "1", [Tensor.from_array("features", rows)], [40]), timeout=30.0
    )
    assert result.outputs[0].shape == (40, 2)
    timings = await published.until(lambda t: len(t.get("mlp/1", {})) > len(warmup_sizes(8)))
    assert sorted(map(int, timings["mlp/1"])) == warmup_sizes(64)
    assert sorted(worker.core.warmup_timings("mlp", "1")) == warmup_sizes(64)

    # A smaller one needs no warm-up: the timings of the sizes swept stay.
    config.put("models/mlp/1", _record(demo_models["mlp"], sha256, 4))
    assert sorted(worker.core.warmup_timings("mlp", "1")) == warmup_sizes(64)
