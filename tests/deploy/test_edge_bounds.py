"""The launcher keeps the edge's bounds per model equal to the registry's `edge_inflight`
(deploy/edge_bounds.py), on an in-memory config and a fake reload; tests/deploy/test_edge.py
reloads a real nginx."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from deploy.edge import EdgeConfig
from deploy.edge_bounds import EdgeBounds, model_bounds
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.types import BatchingPolicy, ModelVersion, Signature
from tests.waiting import wait_for

SIGNATURE = Signature.from_json({
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
})


def record(model: str, version: str, edge_inflight: int | None) -> dict[str, Any]:
    """A valid `models/{model}/{version}` record declaring `edge_inflight`."""
    return ModelVersion(
        model, version, SIGNATURE, "http://127.0.0.1:8200/v1/artifacts/" + "a" * 64, "a" * 64,
        batching=BatchingPolicy(edge_inflight=edge_inflight),
    ).to_json()


class FakeEdge:
    """`reload` as nginx's: records each configuration; `refuse` makes the next ones fail;
    `gate` (when set) holds a reload until it is released."""

    def __init__(self) -> None:
        self.reloads: list[EdgeConfig] = []
        self.refuse = False
        self.gate: threading.Event | None = None

    def reload(self, config: EdgeConfig) -> None:
        if self.gate is not None:
            assert self.gate.wait(20)
        if self.refuse:
            raise RuntimeError("nginx rejected nginx.conf.next: something")
        self.reloads.append(config)


def test_a_models_bound_is_the_largest_its_versions_declare() -> None:
    config = StaticConfig({
        "models/mlp/1": record("mlp", "1", 64), "models/mlp/2": record("mlp", "2", 96),
        "models/mlp/3": record("mlp", "3", None),
        "models/encoder/1": record("encoder", "1", None),  # the edge's default
        "models/bad/1": {**record("bad", "1", 8), "sha256": "../x"},  # fails the trust checks
        "models/zed/1": record("zed", "1", 8),
        "rollouts/mlp": {"model": "mlp"},
    })
    assert model_bounds(config) == (("mlp", 96), ("zed", 8))


async def test_the_edge_reloads_when_the_registry_changes_a_bound() -> None:
    config = StaticConfig({"models/mlp/1": record("mlp", "1", None)})
    edge = FakeEdge()
    start = EdgeConfig(8080, "127.0.0.1:8000", "127.0.0.1:8001", model_conns=128)
    bounds = EdgeBounds(edge.reload, start, config)
    config.subscribe(bounds.changed)
    bounds.changed()
    assert bounds.applied == start and not edge.reloads  # nothing declared: nothing to do

    config.put("models/mlp/1", record("mlp", "1", 64))
    await wait_for(lambda: bounds.applied.model_bounds == (("mlp", 64),),
                   timeout=10, what="mlp bound to 64")
    assert [c.model_bounds for c in edge.reloads] == [(("mlp", 64),)]
    assert edge.reloads[0].model_conns == 128 and edge.reloads[0].h2c_port == 8080

    config.put("models/rollouts-unrelated", {"x": 1})  # any other change: no reload
    await asyncio.sleep(0)
    config.delete("models/mlp/1")  # no version declares one: back to the default
    await wait_for(lambda: bounds.applied.model_bounds == (),
                   timeout=10, what="the bound removed")
    assert len(edge.reloads) == 2
    await bounds.aclose()


async def test_changes_during_a_reload_end_in_the_last_state_one_reload_at_a_time() -> None:
    config = StaticConfig({"models/mlp/1": record("mlp", "1", None)})
    edge = FakeEdge()
    edge.gate = threading.Event()
    bounds = EdgeBounds(edge.reload, EdgeConfig(8080, "a:1", "b:2"), config)
    config.subscribe(bounds.changed)
    config.put("models/mlp/1", record("mlp", "1", 64))  # its reload now held at the gate
    await asyncio.sleep(0.05)
    for n in (32, 16, 8):
        config.put("models/mlp/1", record("mlp", "1", n))
    edge.gate.set()
    await wait_for(lambda: bounds.applied.model_bounds == (("mlp", 8),),
                   timeout=10, what="the last bound")
    # The first reload, then one for everything that changed while it ran.
    assert [c.model_bounds for c in edge.reloads] == [(("mlp", 64),), (("mlp", 8),)]
    await bounds.aclose()


async def test_a_refused_reload_keeps_the_running_bounds_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = StaticConfig({"models/mlp/1": record("mlp", "1", 64)})
    edge = FakeEdge()
    bounds = EdgeBounds(edge.reload, EdgeConfig(8080, "a:1", "b:2"), config)
    config.subscribe(bounds.changed)
    bounds.changed()
    await wait_for(lambda: bool(edge.reloads),
                   timeout=10, what="the first reload")
    edge.refuse = True
    config.put("models/mlp/1", record("mlp", "1", 32))
    await wait_for(lambda: "keeping the bounds per model" in caplog.text,
                   timeout=10, what="the refusal logged")
    await bounds.aclose()
    assert bounds.applied.model_bounds == (("mlp", 64),)
    config.put("models/other", {"x": 1})  # the same refused bounds are not retried
    await bounds.aclose()
    assert caplog.text.count("keeping the bounds per model") == 1
    edge.refuse = False
    config.put("models/mlp/1", record("mlp", "1", 16))  # a new wanted state is
    await wait_for(lambda: bounds.applied.model_bounds == (("mlp", 16),),
                   timeout=10, what="the next bound")
    await bounds.aclose()
