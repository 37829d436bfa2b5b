"""The router's prediction cache: hits, invalidation on a rollout change, TTL, byte budget,
single flight, failures, tenants; and one pipeline test counting the worker's executions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.batcher.core import Batcher
from services.batcher.workers import LocalWorkerPool
from services.gateway.rest import add_served_headers
from services.mesh.domain.caching import CachePolicy
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import DeadlineExceeded, InvalidInput
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    ModelVersion,
    Rollout,
    Signature,
    TensorSpec,
)
from services.mesh.infra.db import create_pool, migrate
from services.predlog.log import start_prediction_log
from services.registry.app import create_app
from services.router.cache import PredictionCache
from services.router.core import Router
from services.router.metrics import CacheMetrics, RouterMetrics
from services.worker.backends.base import Backend
from services.worker.core import Worker
from services.worker.metrics import WorkerMetrics
from tests.credentials import AUTH, CREDENTIAL
from tests.registry.harness import SIGNATURE as REGISTRY_SIGNATURE
from tests.registry.harness import chunks_of, open_registry
from tests.waiting import wait_for
from tests.worker.stubs import NoArtifacts

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)
HITS = "infermesh_cache_num_hits_per_model_total"
MISSES = "infermesh_cache_num_misses_per_model_total"


class CountingBatcher:
    """Doubles `x` into `y`; counts calls; holds them while `gate` is clear; raises `error`."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None
        self.fail_once: Exception | None = None

    async def infer(self, request: InferRequest) -> InferResponse:
        self.calls += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        failure, self.fail_once = self.fail_once, None
        if failure is not None:
            raise failure
        doubled = Tensor.from_array("y", request.inputs[0].array() * 2)
        return InferResponse(request.model, str(request.version), request.request_id, [doubled])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def records(cache: dict[str, Any] | None, *, stable: str = "1",
            epoch: int = 1) -> dict[str, Any]:
    policy = None if cache is None else CachePolicy.from_json(cache)
    found: dict[str, Any] = {
        f"models/m/{v}": ModelVersion("m", v, SIGNATURE, "file:///dev/null", "0" * 64,
                                      cache=policy).to_json()
        for v in ("1", "2")
    }
    found["rollouts/m"] = Rollout.stable("m", stable, epoch=epoch).to_json()
    for v in ("1", "2"):
        found[f"endpoints/worker/w{v}"] = {"models": [f"m/{v}"]}
    return found


class Bed:
    def __init__(self, cache: dict[str, Any] | None = None) -> None:
        self.config = StaticConfig(records(cache if cache is not None else {"ttl_s": 60}))
        self.batcher = CountingBatcher()
        self.clock = Clock()
        self.metrics = RouterMetrics()
        catalog = ModelCatalog(self.config)
        self.router = Router(catalog, self.batcher, metrics=self.metrics, cache=PredictionCache(
            catalog, CacheMetrics(self.metrics.registry), clock=self.clock))

    async def infer(self, value: float = 1.0, *, tenant: str = "a", request_id: str = "r",
                    deadline: float = 1e12) -> InferResponse:
        x = np.array([[value, value + 1]], dtype=np.float32)
        return await self.router.infer(InferRequest(
            "m", [Tensor.from_array("x", x)], request_id, tenant=tenant, deadline=deadline))

    def count(self, name: str, version: str = "1") -> float:
        value = self.metrics.registry.get_sample_value(name, {"model": "m", "version": version})
        return value or 0.0


@pytest.fixture
async def bed() -> AsyncIterator[Bed]:
    bed = Bed()
    yield bed
    await bed.router.aclose()


async def test_a_repeated_input_is_served_from_the_cache(bed: Bed) -> None:
    first = await bed.infer(1.0, request_id="a")
    again = await bed.infer(1.0, request_id="b")
    other = await bed.infer(2.0, request_id="c")
    assert bed.batcher.calls == 2
    assert (first.parameters["cache"], again.parameters["cache"]) == ("miss", "hit")
    assert other.parameters["cache"] == "miss"
    assert again.request_id == "b" and again.parameters["rollout_epoch"] == 1
    assert bytes(again.outputs[0].data) == bytes(first.outputs[0].data)
    assert (bed.count(HITS), bed.count(MISSES)) == (1.0, 2.0)
    assert bed.count("infermesh_cache_bytes") > 0


async def test_a_version_without_a_policy_is_never_cached() -> None:
    bed = Bed()
    bed.config.put("models/m/1", ModelVersion("m", "1", SIGNATURE, "file:///dev/null",
                                              "0" * 64).to_json())
    for _ in range(2):
        assert "cache" not in (await bed.infer()).parameters
    assert bed.batcher.calls == 2
    await bed.router.aclose()


async def test_a_rollout_change_drops_the_model_s_entries(bed: Bed) -> None:
    await bed.infer()
    assert (await bed.infer()).parameters["cache"] == "hit"
    bed.config.put("rollouts/m", Rollout.stable("m", "1", epoch=2).to_json())
    assert (await bed.infer()).parameters["cache"] == "miss"
    assert bed.count("infermesh_cache_bytes") > 0
    bed.config.put("rollouts/m", Rollout.stable("m", "2", epoch=3).to_json())
    switched = await bed.infer()
    assert (switched.version, switched.parameters["cache"]) == ("2", "miss")
    assert bed.batcher.calls == 3
    assert bed.count("infermesh_cache_bytes") == 0.0


async def test_an_answer_in_flight_across_a_rollout_change_is_not_stored(bed: Bed) -> None:
    bed.batcher.gate.clear()
    pending = asyncio.create_task(bed.infer())
    await wait_for(lambda: bed.batcher.calls == 1, timeout=5, what="the execution")
    bed.config.put("rollouts/m", Rollout.stable("m", "1", epoch=2).to_json())
    bed.batcher.gate.set()
    assert (await pending).parameters["cache"] == "miss"
    assert (await bed.infer()).parameters["cache"] == "miss"


async def test_entries_expire_after_their_ttl(bed: Bed) -> None:
    await bed.infer()
    bed.clock.now += 59.9
    assert (await bed.infer()).parameters["cache"] == "hit"
    bed.clock.now += 0.2
    assert (await bed.infer()).parameters["cache"] == "miss"
    assert bed.metrics.registry.get_sample_value(
        "infermesh_cache_evictions_total", {"model": "m", "reason": "ttl"}) == 1.0


async def test_the_byte_budget_evicts_the_least_recently_used() -> None:
    bed = Bed({"max_bytes": 2 * (256 + 8 + 1)})  # two entries of one 2-float row
    await bed.infer(1.0)
    await bed.infer(2.0)
    await bed.infer(1.0)  # 1.0 now the most recently used
    await bed.infer(3.0)  # evicts 2.0
    assert (await bed.infer(1.0)).parameters["cache"] == "hit"
    assert (await bed.infer(2.0)).parameters["cache"] == "miss"
    assert bed.count("infermesh_cache_bytes") == 2 * (256 + 8 + 1)
    await bed.router.aclose()


async def test_100_concurrent_identical_misses_execute_once(bed: Bed) -> None:
    bed.batcher.gate.clear()
    calls = [asyncio.create_task(bed.infer(request_id=f"r{i}")) for i in range(100)]
    await wait_for(lambda: bed.count(HITS) == 99, timeout=10, what="99 requests joined")
    bed.batcher.gate.set()
    answers = await asyncio.gather(*calls)
    assert bed.batcher.calls == 1
    assert sorted(a.parameters["cache"] for a in answers).count("coalesced") == 99
    assert {a.request_id for a in answers} == {f"r{i}" for i in range(100)}
    assert (await bed.infer()).parameters["cache"] == "hit"


async def test_a_failure_reaches_every_waiter_and_is_not_cached(bed: Bed) -> None:
    bed.batcher.gate.clear()
    bed.batcher.error = InvalidInput("input 'x': no")
    calls = [asyncio.create_task(bed.infer(request_id=f"r{i}")) for i in range(5)]
    await wait_for(lambda: bed.count(HITS) == 4, timeout=10, what="4 requests joined")
    bed.batcher.gate.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, InvalidInput) for o in outcomes)
    bed.batcher.error = None
    assert (await bed.infer()).parameters["cache"] == "miss"
    assert bed.batcher.calls == 2


async def test_a_waiter_leaving_does_not_cancel_the_shared_execution(bed: Bed) -> None:
    bed.batcher.gate.clear()
    leader = asyncio.create_task(bed.infer(request_id="leader"))
    await wait_for(lambda: bed.batcher.calls == 1, timeout=5, what="the execution")
    patient = asyncio.create_task(bed.infer(request_id="patient"))
    with pytest.raises(DeadlineExceeded):  # its own deadline, while the execution goes on
        await bed.infer(request_id="hasty", deadline=time.time() + 0.05)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    bed.batcher.gate.set()
    answer = await patient
    assert (answer.request_id, answer.parameters["cache"]) == ("patient", "coalesced")
    assert bed.batcher.calls == 1


async def test_a_waiter_outliving_the_shared_deadline_executes_again(bed: Bed) -> None:
    bed.batcher.gate.clear()
    leader = asyncio.create_task(bed.infer(request_id="leader"))
    await wait_for(lambda: bed.batcher.calls == 1, timeout=5, what="the execution")
    follower = asyncio.create_task(bed.infer(request_id="follower"))
    await wait_for(lambda: bed.count(HITS) == 1, timeout=5, what="the follower joined")
    bed.batcher.fail_once = DeadlineExceeded("the leader's deadline")
    bed.batcher.gate.set()
    with pytest.raises(DeadlineExceeded):
        await leader
    answer = await follower
    assert (answer.parameters["cache"], bed.batcher.calls) == ("miss", 2)


@pytest.mark.parametrize(("per_tenant", "second"), [(False, "hit"), (True, "miss")])
async def test_tenants_share_answers_unless_the_policy_says_per_tenant(
    per_tenant: bool, second: str
) -> None:
    bed = Bed({"per_tenant": per_tenant})
    await bed.infer(tenant="a")
    assert (await bed.infer(tenant="b")).parameters["cache"] == second
    assert (await bed.infer(tenant="a")).parameters["cache"] == "hit"
    await bed.router.aclose()


@pytest.mark.parametrize(("raw", "field"), [
    ({"ttl_s": 0}, "ttl_s"), ({"ttl_s": "60"}, "ttl_s"), ({"max_bytes": 1.5}, "max_bytes"),
    ({"per_tenant": "yes"}, "per_tenant"), ({"ttls": 1}, "ttls"), ([], "cache"),
])
def test_a_bad_policy_is_refused_naming_its_field(raw: Any, field: str) -> None:
    with pytest.raises(InvalidInput, match=f"cache: .*{field}|^{field}"):
        CachePolicy.from_json(raw)


def test_a_policy_round_trips_through_the_version_record() -> None:
    record = ModelVersion("m", "1", SIGNATURE, "file:///dev/null", "0" * 64,
                          cache=CachePolicy(ttl_s=5, max_bytes=1024, per_tenant=True))
    assert ModelVersion.from_json(record.to_json()) == record
    plain = ModelVersion("m", "1", SIGNATURE, "file:///dev/null", "0" * 64)
    assert "cache" not in plain.to_json()


class DoublingBackend:
    """A real worker core's backend: doubles `x`; counts the batches it runs."""

    device = "cpu"

    def __init__(self) -> None:
        self.batches = 0

    def load(self, artifact: Path) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        return {}

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.batches += 1
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        pass


async def test_100_identical_requests_run_once_on_a_real_worker() -> None:
    """Router core -> in-process batcher core -> worker core, as fused mode wires them."""
    config = StaticConfig(records({"ttl_s": 60}))
    catalog, backend, worker_metrics = ModelCatalog(config), DoublingBackend(), WorkerMetrics()

    def factory(spec: ModelVersion) -> Backend:
        return backend

    worker = Worker(catalog, models=("m",), artifacts=NoArtifacts(), backend_factory=factory,
                    metrics=worker_metrics)
    worker.start()
    batcher = Batcher(catalog, LocalWorkerPool(worker))
    batcher.start()
    router = Router(catalog, batcher)
    try:
        await wait_for(lambda: worker.is_ready("m", "1"), timeout=30, what="the worker ready")
        x = Tensor.from_array("x", np.array([[1.0, 2.0]], dtype=np.float32))
        answers = await asyncio.gather(*(router.infer(InferRequest(
            "m", [x], f"r{i}", deadline=time.time() + 60)) for i in range(100)))
        assert {bytes(a.outputs[0].data) for a in answers} == {
            np.array([[2.0, 4.0]], dtype=np.float32).tobytes()}
        executed = worker_metrics.registry.get_sample_value(
            "infermesh_worker_requests_total", {"model": "m", "version": "1", "device": "cpu"})
        assert (executed, backend.batches) == (1.0, 1)
    finally:
        await router.aclose()
        await batcher.aclose()
        await worker.aclose()


async def test_the_registry_takes_validates_and_changes_a_cache_policy(
    database_url: str, etcd_url: str, etcd_prefix: str, tmp_path: Path
) -> None:
    async with open_registry(database_url, etcd_url, etcd_prefix, tmp_path) as harness:
        app = create_app(harness.registry, credential=CREDENTIAL)
        async with TestClient(TestServer(app), headers=AUTH) as client:
            sha = (await harness.registry.put_artifact(chunks_of(b"weights"))).sha256
            body = {"artifact_sha256": sha, "signature": REGISTRY_SIGNATURE}
            bad = await client.put("/v1/models/iris/versions/1",
                                   json={**body, "cache": {"ttl_s": -1}})
            assert bad.status == 400 and "cache: 'ttl_s'" in await bad.text()
            made = await client.put("/v1/models/iris/versions/1",
                                    json={**body, "cache": {"ttl_s": 30}})
            assert made.status == 201
            assert (await harness.etcd_json("models/iris/1"))["cache"] == {
                "ttl_s": 30.0, "max_bytes": 64 << 20, "per_tenant": False}
            changed = await client.put("/v1/models/iris/versions/1/cache",
                                       json={"ttl_s": 5, "per_tenant": True})
            assert changed.status == 200
            assert (await harness.etcd_json("models/iris/1"))["cache"]["per_tenant"] is True
            assert (await client.delete("/v1/models/iris/versions/1/cache")).status == 200
            assert "cache" not in await harness.etcd_json("models/iris/1")


def test_a_rest_answer_names_how_the_cache_served_it() -> None:
    headers: dict[str, str] = {}
    add_served_headers(headers, InferResponse("m", "1", "r", [], {"cache": "hit"}))
    assert headers["Infermesh-Cache"] == "hit"


async def test_hits_are_logged_as_predictions_with_the_cache_flag(
    database_url: str, tmp_path: Path
) -> None:
    pool = await create_pool(database_url)
    await migrate(pool)
    config = StaticConfig(records({"ttl_s": 60}))
    predictions = await start_prediction_log(
        database_url, registry=CollectorRegistry(), instance="p", spool_root=str(tmp_path))
    assert predictions is not None
    router = Router(ModelCatalog(config), CountingBatcher(), prediction_log=predictions)
    try:
        x = Tensor.from_array("x", np.array([[1.0, 2.0]], dtype=np.float32))
        for request_id in ("first", "second"):
            await router.infer(InferRequest("m", [x], request_id))
        await predictions.flush()
        found = await pool.fetch("SELECT request_id, cache FROM predictions ORDER BY request_id")
        assert [(r["request_id"], r["cache"]) for r in found] == [
            ("first", "miss"), ("second", "hit")]
    finally:
        await router.aclose()
        await predictions.aclose()
        await pool.close()
