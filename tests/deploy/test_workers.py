"""The launcher's worker fleet on fake processes and an in-memory config: a draining worker is
replaced at once and let go; `replace` waits for the new worker to be ready before it stops
the old one."""

from __future__ import annotations

import asyncio
import itertools

from deploy.workers import WorkerFleet
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.types import ModelVersion, Signature

_pids = itertools.count(1000)

MLP_1 = ModelVersion(
    "mlp", "1", Signature.from_json({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }), "http://127.0.0.1:8200/v1/artifacts/" + "a" * 64, "a" * 64,
).to_json()
"""A valid `models/mlp/1` record (the fleet starts no worker for an invalid one)."""


class FakeProcess:
    """A supervised process that only records what the fleet asked of it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: int | None = next(_pids)
        self.retired = False
        self.stopped: list[bool] = []

    def retire(self) -> None:
        self.retired = True

    async def stop(self, timeout: float = 10.0, *, now: bool = False) -> None:
        self.stopped.append(now)


def worker_name(model: str, version: str | None) -> str:
    """The launcher's name for a worker of `model`'s shared versions or of `version` alone."""
    return f"worker-{model}" if version is None else f"worker-{model}-{version}"


def fleet_over(
    config: StaticConfig, *, per_version: bool = False,
) -> tuple[WorkerFleet[FakeProcess], list[FakeProcess]]:
    spawned: list[FakeProcess] = []

    def spawn(model: str, version: str | None) -> FakeProcess:
        spawned.append(FakeProcess(worker_name(model, version)))
        return spawned[-1]

    fleet = WorkerFleet(spawn, config, handoff_bound=1.0, per_version=per_version)
    config.subscribe(fleet.ensure)
    return fleet, spawned


def register(
    config: StaticConfig, process: FakeProcess, *, draining: bool = False,
    models: tuple[str, ...] = ("mlp/1",),
) -> None:
    """What the worker process publishes once `models` are ready (and on SIGTERM)."""
    config.put(f"endpoints/worker/i{process.pid}", {
        "instance": f"i{process.pid}", "pid": process.pid, "models": list(models),
        "draining": draining,
    })


def test_a_draining_worker_is_replaced_at_once_and_let_go() -> None:
    config = StaticConfig({"models/mlp/1": MLP_1})
    fleet, spawned = fleet_over(config)
    fleet.ensure()
    [old] = spawned
    register(config, old)
    assert len(spawned) == 1
    register(config, old, draining=True)  # it got SIGTERM
    assert len(spawned) == 2 and old.retired
    assert fleet.worker("mlp", "1") is spawned[1]
    register(config, spawned[1])
    register(config, old, draining=True)  # later changes start nothing more
    assert len(spawned) == 2 and not spawned[1].retired


async def test_replace_stops_the_old_worker_only_once_the_new_one_is_ready() -> None:
    config = StaticConfig({"models/mlp/1": MLP_1})
    fleet, spawned = fleet_over(config)
    fleet.ensure()
    [old] = spawned
    register(config, old)
    replacing = asyncio.create_task(fleet.replace("mlp", "1", timeout=10))
    await asyncio.sleep(0)  # replace() spawns before its first suspension
    new = spawned[1]
    config.put(f"endpoints/worker/i{new.pid}", {"pid": new.pid, "models": []})  # loading
    # Nothing to wait for in an absence: let the loop run the task a few rounds.
    for _ in range(20):
        await asyncio.sleep(0)
    assert not old.stopped and not replacing.done()
    register(config, new)
    async with asyncio.timeout(5):
        await replacing
    assert old.stopped == [False], "the old worker gets SIGTERM (hand off), once"
    assert fleet.worker("mlp", "1") is new
    register(config, old, draining=True)  # its handoff starts no third worker
    assert len(spawned) == 2
