"""The launcher's worker fleet starts no process for a `models/` record that fails the trust
checks: it logs a warning naming the key and the field (once per content) and goes on with the
valid ones."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from deploy.workers import WorkerFleet
from services.mesh.domain.config import StaticConfig
from tests.deploy.test_workers import MLP_1, FakeProcess, fleet_over

HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("models/mlp/2", {**MLP_1, "version": "2", "sha256": "../../victim.txt"}, "sha256"),
    ("models/mlp/3", {**MLP_1, "version": "3",
                      "batching": {**MLP_1["batching"], "max_batch_size": 10**8}},
     "'max_batch_size'"),
    ("models/mlp/4", {**MLP_1, "version": "4", "platform": "../../bin"}, "platform"),
    ("models/mlp/5/../../x", {**MLP_1, "version": "5"}, "key"),
    ("models/..", {**MLP_1, "model": ".."}, "key"),
    ("models/mlp/6", {**MLP_1, "version": "7"}, "model: the record names mlp/7"),
    ("models/mlp/8", {"model": "mlp"}, "missing field"),
]


def spawned_names(spawned: list[FakeProcess]) -> list[str]:
    return [p.name for p in spawned]


@pytest.fixture
def config() -> StaticConfig:
    return StaticConfig({"models/mlp/1": MLP_1, **{key: raw for key, raw, _ in HOSTILE}})


def test_hostile_records_start_no_worker_and_are_logged_naming_key_and_field(
    config: StaticConfig, caplog: pytest.LogCaptureFixture
) -> None:
    fleet, spawned = fleet_over(config)
    with caplog.at_level(logging.WARNING, logger="infermesh.up"):
        fleet.ensure()
    assert spawned_names(spawned) == ["worker-mlp"]
    for key, _, field in HOSTILE:
        [line] = [r.getMessage() for r in caplog.records if f"for {key}:" in r.getMessage()]
        assert field in line, line


def test_a_refused_record_is_logged_once_and_a_fixed_one_starts_its_worker(
    config: StaticConfig, caplog: pytest.LogCaptureFixture
) -> None:
    fleet: WorkerFleet[FakeProcess]
    fleet, spawned = fleet_over(config)
    with caplog.at_level(logging.WARNING, logger="infermesh.up"):
        fleet.ensure()
        config.put("endpoints/worker/x", {"pid": 1, "models": []})  # any change: ensure() again
    assert sum("models/mlp/2:" in r.getMessage() for r in caplog.records) == 1
    config.put("models/mlp/2", {**MLP_1, "version": "2", "worker": "dedicated"})
    assert spawned_names(spawned) == ["worker-mlp", "worker-mlp-2"]
