"""The launcher's fleet as the local actuator: it keeps `scale/{model}/{version}` workers per
version (fake processes, in-memory config), stops the newest extras by draining them (SIGTERM;
SIGINT only for the last one of a version going to zero), never replaces a worker it stopped,
and ignores a record that does not parse, logging the field."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from deploy.workers import LOCAL_CEILING, WorkerFleet
from services.mesh.domain.config import StaticConfig
from tests.deploy.test_workers import MLP_1, FakeProcess, register, worker_name


class StoppableProcess(FakeProcess):
    """A fake process whose stop can be awaited by the test."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gone = asyncio.Event()

    async def stop(self, timeout: float = 10.0, *, now: bool = False) -> None:
        await super().stop(timeout, now=now)
        self.gone.set()


def scaled_fleet(
    record: dict[str, Any] | None = None,
) -> tuple[StaticConfig, WorkerFleet[StoppableProcess], list[StoppableProcess]]:
    config = StaticConfig({"models/mlp/1": record or MLP_1})
    spawned: list[StoppableProcess] = []

    def spawn(model: str, version: str | None) -> StoppableProcess:
        spawned.append(StoppableProcess(worker_name(model, version)))
        return spawned[-1]

    fleet = WorkerFleet(spawn, config, handoff_bound=1.0)
    config.subscribe(fleet.ensure)
    fleet.ensure()
    return config, fleet, spawned


def scale(config: StaticConfig, replicas: Any) -> None:
    """What the autoscaler writes."""
    config.put("scale/mlp/1", {"replicas": replicas, "reason": "test", "at": 0.0})


async def stopped(*processes: StoppableProcess) -> None:
    async with asyncio.timeout(5):
        for process in processes:
            await process.gone.wait()


async def test_scale_up_spawns_and_scale_down_drains_the_newest() -> None:
    config, fleet, spawned = scaled_fleet()
    [first] = spawned
    register(config, first)
    scale(config, 3)
    assert len(spawned) == 3 and fleet.workers("mlp", "1") == spawned
    for extra in spawned[1:]:
        register(config, extra)
    scale(config, 1)
    await stopped(*spawned[1:])
    assert [p.stopped for p in spawned] == [[], [False], [False]], "SIGTERM: drain, hand off"
    assert fleet.workers("mlp", "1") == [first]
    for extra in spawned[1:]:
        register(config, extra, draining=True)  # what each does on SIGTERM
    assert len(spawned) == 3, "a worker the fleet stopped is not replaced"
    assert not any(p.retired for p in spawned)


async def test_zero_replicas_stops_the_last_worker_now_and_one_comes_back() -> None:
    config, fleet, spawned = scaled_fleet()
    [only] = spawned
    register(config, only)
    scale(config, 0)
    await stopped(only)
    assert only.stopped == [True], "no replacement to hand off to: SIGINT, drain, exit"
    assert fleet.workers("mlp", "1") == [] and fleet.worker("mlp", "1") is None
    config.delete(f"endpoints/worker/i{only.pid}")
    assert len(spawned) == 1
    scale(config, 1)
    assert len(spawned) == 2 and fleet.worker("mlp", "1") is spawned[1]


async def test_a_scale_record_that_does_not_parse_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, fleet, spawned = scaled_fleet()
    scale(config, 2)
    assert len(spawned) == 2
    with caplog.at_level(logging.WARNING, logger="infermesh.up"):
        scale(config, "3")
        fleet.ensure()
        config.put("scale/mlp/1", [3])
    assert len(spawned) == 2 and len(fleet.workers("mlp", "1")) == 2, "the count stays"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "ignoring scale/mlp/1: replicas: must be an integer >= 0",
        "ignoring scale/mlp/1: record: not a JSON object",
    ], "once per content, naming the key and the field"


async def test_the_version_record_bounds_the_count(caplog: pytest.LogCaptureFixture) -> None:
    config, fleet, spawned = scaled_fleet({**MLP_1, "replicas": {"min": 2, "max": 3}})
    assert len(spawned) == 2, "no scale record: replicas.min"
    scale(config, 5)
    assert len(fleet.workers("mlp", "1")) == 3, "clamped to replicas.max"
    config.put("scale/mlp/1", {"replicas": 10 * LOCAL_CEILING})
    config.put("models/mlp/1", MLP_1)
    assert len(fleet.workers("mlp", "1")) == LOCAL_CEILING, "no max: the local ceiling"
    scale(config, 2)
    await stopped(*spawned[2:])
    with caplog.at_level(logging.WARNING, logger="infermesh.up"):
        config.put("models/mlp/1", {**MLP_1, "replicas": {"min": -1}})
    assert "ignoring the replica bounds of models/mlp/1: replicas.min: must be an integer >= 0" \
        in caplog.text
    assert len(fleet.workers("mlp", "1")) == 2
