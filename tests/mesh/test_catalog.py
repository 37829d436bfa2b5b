from __future__ import annotations

from typing import Any

import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import NotFound
from services.mesh.domain.types import Rollout, Route

SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}


def version_record(model: str, version: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model, "version": version, "signature": SIGNATURE,
        "artifact_uri": f"file:///{model}/{version}.pt", "sha256": "0" * 64, **extra,
    }


def canary(model: str, stable: str, candidate: str) -> dict[str, Any]:
    rollout = Rollout(model, (Route(stable, 90.0), Route(candidate, 10.0)), fallback=stable)
    return rollout.to_json()


@pytest.fixture
def config() -> StaticConfig:
    return StaticConfig({
        "models/resnet/1": version_record("resnet", "1"),
        "models/resnet/2": version_record("resnet", "2"),
        "models/resnet/10": version_record("resnet", "10"),
        "rollouts/resnet": canary("resnet", "2", "10"),
    })


def test_resolve_pinned_version(config: StaticConfig) -> None:
    catalog = ModelCatalog(config)
    resolved = catalog.resolve("resnet", "1")
    assert (resolved.model, resolved.version) == ("resnet", "1")
    assert resolved.signature.inputs[0].name == "x"


def test_resolve_without_version_uses_the_rollout_primary(config: StaticConfig) -> None:
    catalog = ModelCatalog(config)
    assert catalog.resolve("resnet", None).version == "2"
    assert catalog.resolve("resnet", "").version == "2"
    config.put("rollouts/resnet", canary("resnet", "10", "2"))
    assert catalog.resolve("resnet", None).version == "10"


def test_not_found_names_the_model_and_version(config: StaticConfig) -> None:
    catalog = ModelCatalog(config)
    with pytest.raises(NotFound, match="unknown model 'bert'"):
        catalog.resolve("bert", "1")
    with pytest.raises(NotFound, match="unknown model 'bert'"):
        catalog.resolve("bert", None)
    with pytest.raises(NotFound, match="unknown version '7' of model 'resnet'"):
        catalog.resolve("resnet", "7")


def test_rollout_naming_an_unregistered_version_is_not_found(config: StaticConfig) -> None:
    config.put("rollouts/resnet", canary("resnet", "9", "1"))
    catalog = ModelCatalog(config)
    with pytest.raises(NotFound, match="unknown version '9' of model 'resnet'"):
        catalog.resolve("resnet", None)


def test_empty_rollout_has_no_version_to_serve() -> None:
    catalog = ModelCatalog(StaticConfig({"rollouts/bert": {"model": "bert", "routes": []}}))
    assert catalog.models() == ["bert"]
    with pytest.raises(NotFound, match="model 'bert' has no version to serve"):
        catalog.resolve("bert", None)


def test_bad_records_are_ignored(config: StaticConfig) -> None:
    config.put("models/resnet/3", {"model": "resnet", "version": "3", "signature": {}})
    config.put("models/resnet/4", version_record("resnet", "4", device="tpu"))
    config.put("models/bert/1", {"version": "1"})  # no model
    config.put("rollouts/bert", {"routes": [{"version": "1", "weight": 1}]})  # no model
    config.put("rollouts/gpt", {"model": "gpt", "routes": [{"version": "1"}]})  # no weight
    catalog = ModelCatalog(config)
    assert [v.version for v in catalog.versions("resnet")] == ["1", "2", "10"]
    assert catalog.models() == ["resnet"]
    with pytest.raises(NotFound):
        catalog.version("resnet", "3")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("models/resnet/5", "not an object"),
        ("rollouts/bert", ["not", "an", "object"]),
        ("models/resnet/6", {**version_record("resnet", "6"), "signature": []}),
        ("models/resnet/7", {**version_record("resnet", "7"), "batching": []}),
    ],
)
def test_records_that_are_not_objects_are_ignored(
    config: StaticConfig, key: str, value: Any
) -> None:
    config.put(key, value)
    catalog = ModelCatalog(config)
    assert [v.version for v in catalog.versions("resnet")] == ["1", "2", "10"]
    assert catalog.models() == ["resnet"]


def test_catalog_follows_config_changes(config: StaticConfig) -> None:
    catalog = ModelCatalog(config)
    config.put("models/bert/1", version_record("bert", "1"))
    config.put("rollouts/bert", Rollout.stable("bert", "1").to_json())
    assert catalog.models() == ["bert", "resnet"]
    assert catalog.resolve("bert", None).version == "1"
    config.delete("models/resnet/2")
    with pytest.raises(NotFound, match="unknown version '2'"):
        catalog.resolve("resnet", None)


def test_ready_workers_counts_worker_records(config: StaticConfig) -> None:
    config.put("endpoints/worker/w1", {"link": "ws://w1", "models": ["resnet/2", "resnet/10"]})
    config.put("endpoints/worker/w2", {"link": "ws://w2", "models": ["resnet/2"]})
    config.put("endpoints/worker/w3", {"link": "ws://w3"})
    config.put("endpoints/worker/w4", "not an object")
    config.put("endpoints/batcher/b1", {"link": "ws://b1", "models": ["resnet/1"]})
    catalog = ModelCatalog(config)
    assert catalog.ready_workers("resnet", "2") == 2
    assert catalog.ready_workers("resnet", "10") == 1
    assert catalog.ready_workers("resnet", "1") == 0
    assert catalog.ready_workers("bert", "1") == 0

    config.delete("endpoints/worker/w2")
    assert catalog.ready_workers("resnet", "2") == 1
