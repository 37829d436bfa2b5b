"""The launcher's fleet keyed by model: one set of workers serves every version of a model (as
many as its busiest version asks for, or its autoscaled versions together), a `dedicated`
version gets a set of its own, and `INFERMESH_WORKERS_PER=version` brings back one set per
version."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deploy.worker_counts import workers_per_version
from deploy.workers import WorkerFleet
from services.mesh.domain.config import StaticConfig
from tests.deploy.test_fleet_scale import StoppableProcess, stopped
from tests.deploy.test_workers import MLP_1, FakeProcess, fleet_over, register, worker_name

MLP_2 = {**MLP_1, "version": "2"}
ENCODER_1 = {**MLP_1, "model": "encoder"}


def scale(config: StaticConfig, version: str, replicas: int) -> None:
    """What the autoscaler writes for mlp/`version`."""
    config.put(f"scale/mlp/{version}", {"replicas": replicas, "reason": "test", "at": 0.0})


def stoppable_fleet(
    records: dict[str, Any],
) -> tuple[StaticConfig, WorkerFleet[StoppableProcess], list[StoppableProcess]]:
    config = StaticConfig(records)
    spawned: list[StoppableProcess] = []

    def spawn(model: str, version: str | None) -> StoppableProcess:
        spawned.append(StoppableProcess(worker_name(model, version)))
        return spawned[-1]

    fleet = WorkerFleet(spawn, config, handoff_bound=1.0)
    config.subscribe(fleet.ensure)
    fleet.ensure()
    return config, fleet, spawned


def test_one_worker_serves_every_version_of_a_model() -> None:
    config = StaticConfig({"models/mlp/1": MLP_1, "models/mlp/2": MLP_2,
                           "models/encoder/1": ENCODER_1})
    fleet, spawned = fleet_over(config)
    fleet.ensure()
    assert sorted(p.name for p in spawned) == ["worker-encoder", "worker-mlp"]
    assert fleet.workers("mlp", "1") == fleet.workers("mlp", "2") == [fleet.worker("mlp", "1")]
    config.put("models/mlp/3", {**MLP_1, "version": "3"})
    assert len(spawned) == 2, "a canary costs no process"


async def test_the_shared_count_is_the_largest_count_or_the_sum_of_the_autoscaled_ones() -> None:
    config, fleet, spawned = stoppable_fleet({"models/mlp/1": MLP_1, "models/mlp/2": MLP_2})
    assert len(spawned) == 1, "two versions at replicas.min 1 share one worker"
    scale(config, "2", 3)
    assert len(fleet.workers("mlp", "1")) == 3, "the busiest version sizes the set"
    scale(config, "1", 2)
    assert len(spawned) == 5, "both autoscaled: the set carries both demands"
    scale(config, "2", 1)
    await stopped(spawned[4])
    await stopped(spawned[3])
    assert fleet.workers("mlp", "1") == spawned[:3]
    assert spawned[3].stopped == spawned[4].stopped == [False], "handed off: SIGTERM"


async def test_a_model_scaled_to_zero_in_every_version_stops_its_last_worker_now() -> None:
    config, fleet, spawned = stoppable_fleet({"models/mlp/1": MLP_1, "models/mlp/2": MLP_2})
    [only] = spawned
    scale(config, "1", 0)
    assert fleet.workers("mlp", "2") == [only], "mlp/2 still asks for one"
    scale(config, "2", 0)
    await stopped(only)
    assert only.stopped == [True], "no replacement to hand off to: SIGINT"
    assert fleet.worker("mlp", "1") is None
    scale(config, "2", 1)
    assert fleet.worker("mlp", "1") is spawned[1]


async def test_a_dedicated_version_gets_workers_of_its_own_counted_apart() -> None:
    config, fleet, spawned = stoppable_fleet({
        "models/mlp/1": MLP_1, "models/mlp/2": {**MLP_2, "worker": "dedicated"}})
    assert sorted(p.name for p in spawned) == ["worker-mlp", "worker-mlp-2"]
    shared, own = fleet.worker("mlp", "1"), fleet.worker("mlp", "2")
    assert shared is not None and own is not None and shared is not own
    assert shared.name == "worker-mlp" and own.name == "worker-mlp-2"
    scale(config, "2", 3)
    assert len(fleet.workers("mlp", "2")) == 3 and fleet.workers("mlp", "1") == [shared], \
        "the dedicated version's scale sizes only its own workers"
    scale(config, "2", 0)
    await stopped(*(p for p in spawned if p is not shared))
    assert fleet.workers("mlp", "1") == [shared] and fleet.worker("mlp", "2") is None


def test_workers_per_version_gives_each_version_its_own() -> None:
    config = StaticConfig({"models/mlp/1": MLP_1, "models/mlp/2": MLP_2})
    fleet, spawned = fleet_over(config, per_version=True)
    fleet.ensure()
    assert [p.name for p in spawned] == ["worker-mlp-1", "worker-mlp-2"]
    assert fleet.worker("mlp", "1") is not fleet.worker("mlp", "2")


@pytest.mark.parametrize(("env", "per_version"), [
    ({}, False), ({"INFERMESH_WORKERS_PER": "model"}, False),
    ({"INFERMESH_WORKERS_PER": "version"}, True),
])
def test_workers_per_setting(env: dict[str, str], per_version: bool) -> None:
    assert workers_per_version(env) is per_version


def test_a_bad_workers_per_setting_names_it() -> None:
    with pytest.raises(ValueError, match="INFERMESH_WORKERS_PER: must be one of model, version"):
        workers_per_version({"INFERMESH_WORKERS_PER": "versions"})


async def test_replacing_a_shared_worker_waits_for_every_version_the_old_one_serves() -> None:
    config = StaticConfig({"models/mlp/1": MLP_1, "models/mlp/2": MLP_2})
    fleet, spawned = fleet_over(config)
    fleet.ensure()
    [old] = spawned
    register(config, old, models=("mlp/1", "mlp/2"))
    replacing = asyncio.create_task(fleet.replace("mlp", "1", timeout=10))
    await asyncio.sleep(0)  # replace() spawns before its first suspension
    new: FakeProcess = spawned[1]
    assert new.name == "worker-mlp"
    register(config, new, models=("mlp/1",))  # mlp/2 not yet ready there
    for _ in range(20):  # nothing to wait for in an absence: let the task run a few rounds
        await asyncio.sleep(0)
    assert not old.stopped and not replacing.done()
    register(config, new, models=("mlp/1", "mlp/2"))
    async with asyncio.timeout(5):
        await replacing
    assert old.stopped == [False] and fleet.workers("mlp", "2") == [new]
