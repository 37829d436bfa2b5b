"""The local actuator end to end: the launcher's fleet follows `scale/mlp/1` with real worker
processes, and the batcher in front of them fails no request meanwhile.

Cheaper than a whole mesh and enough for what is tested: real etcd, the launcher's
`WorkerFleet` supervising real `python -m services.worker` processes (the demo mlp from a
`file:` store), and a real batcher core dispatching over real links (`LinkedWorkerPool`) to
the workers it finds in etcd. The test writes `scale/` itself, as the autoscaler would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.supervisor import Supervised
from deploy.workers import WorkerFleet
from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import InfermeshError
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, ModelVersion, Signature
from services.mesh.infra.credentials import MeshCredential
from services.mesh.infra.digests import sha256_of
from services.mesh.infra.etcd import ConfigCache, connect_client
from services.mesh.transport.linked import LinkedWorkerPool
from services.mesh.transport.peers import LinkPool
from services.worker.demo_models import DemoModel, build_demo_models
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

START = 90.0
"""Seconds a worker process may take to start, load and warm up on a busy 2-core machine."""
CLIENTS = 3
"""Concurrent request loops of the steady light load."""


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoModel, str]:
    """The demo mlp and its sha256 (built and hashed before any loop runs: both block)."""
    model = next(m for m in build_demo_models(tmp_path_factory.mktemp("demo")) if m.name == "mlp")
    return model, sha256_of(model.artifact)


@dataclass
class Bed:
    config: ConfigCache
    fleet: WorkerFleet[Supervised]
    batcher: Batcher
    metrics: BatcherMetrics
    session: aiohttp.ClientSession
    put: Any
    """`await put(key, value)`: write a key under the test's prefix."""

    async def scale(self, replicas: int) -> None:
        """Write `scale/mlp/1` as the autoscaler does; return once the fleet's view has it."""
        record = {"replicas": replicas, "reason": "test", "at": time.time()}
        await self.put("scale/mlp/1", record)
        await self.config.wait_for(lambda: self.config.get("scale/mlp/1") == record, 10)

    def records(self) -> list[dict[str, Any]]:
        """The mlp/1 worker records in etcd, as the batcher's pool sees them."""
        return [r for r in self.config.items("endpoints/worker/").values()
                if isinstance(r, dict) and "mlp/1" in r.get("models", ())]

    def serving(self) -> set[int]:
        """Pids of the workers that serve mlp/1 and are not draining."""
        return {r["pid"] for r in self.records() if not r.get("draining")}

    def queued_rows(self) -> float:
        labels = {"model": "mlp", "version": "1", "lane": "realtime"}
        value = self.metrics.registry.get_sample_value("infermesh_batcher_queue_rows", labels)
        return value or 0.0

    async def rows_run_by(self, pid: int) -> float:
        """Rows worker `pid` executed, from its own /metrics."""
        [record] = [r for r in self.records() if r["pid"] == pid]
        async with self.session.get(f"{record['http']}/metrics") as response:
            text = await response.text()
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == "infermesh_worker_rows_total")


@pytest.fixture
async def bed(
    etcd_url: str, etcd_prefix: str, mlp: tuple[DemoModel, str], mesh_credential_file: Path,
    tmp_path: Path,
) -> AsyncIterator[Bed]:
    model, sha256 = mlp
    etcd = connect_client(etcd_url)

    async def put(key: str, value: Any) -> None:
        await etcd.put(f"{etcd_prefix}{key}".encode(), orjson.dumps(value))

    record = ModelVersion("mlp", "1", Signature.from_json(model.signature),
                          model.artifact.as_uri(), sha256, device="cpu").to_json()
    await put("models/mlp/1", record)
    env = {
        **os.environ, "INFERMESH_ETCD_URL": etcd_url, "INFERMESH_ETCD_PREFIX": etcd_prefix,
        "INFERMESH_WORKER_ARTIFACT_STORES": model.artifact.parent.as_uri(),
        "INFERMESH_WORKER_CACHE_DIR": str(tmp_path / "cache"), "INFERMESH_WORKER_THREADS": "1",
        "INFERMESH_MESH_CREDENTIAL_FILE": str(mesh_credential_file),
    }
    numbers = itertools.count()

    def spawn(model: str, version: str | None) -> Supervised:
        served = model if version is None else f"{model}/{version}"  # as the launcher does
        child = Supervised(f"worker-{served.replace('/', '-')}-{next(numbers)}",
                           ["-m", "services.worker"],
                           env={**env, "INFERMESH_WORKER_MODELS": served}, log_dir=tmp_path)
        child.start()
        spawned.append(child)
        return child

    spawned: list[Supervised] = []
    config = ConfigCache(etcd, etcd_prefix)
    credential = await asyncio.to_thread(MeshCredential.load, mesh_credential_file)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(etcd.close)
        await config.start()
        stack.push_async_callback(config.aclose)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        links = LinkPool(session, config, "worker", credential=credential)
        links.start()
        stack.push_async_callback(links.aclose)
        metrics = BatcherMetrics()
        # A short no-worker grace: a request held for a starting worker is held by the scale
        # record, not by a grace long enough to cover the start.
        batcher = Batcher(ModelCatalog(config), LinkedWorkerPool(links), metrics=metrics,
                          no_worker_grace=0.5)
        batcher.start()
        stack.push_async_callback(batcher.aclose)
        fleet = WorkerFleet(spawn, config, handoff_bound=30.0)
        stack.push_async_callback(_stop_all, spawned)
        stack.push_async_callback(fleet.aclose)
        yield Bed(config, fleet, batcher, metrics, session, put)


async def _stop_all(spawned: list[Supervised]) -> None:
    await asyncio.gather(*(child.stop(now=True) for child in spawned))


def request(deadline: float) -> InferRequest:
    rows = np.random.default_rng().random((1, 32), dtype=np.float32)
    return InferRequest("mlp", [Tensor.from_array("features", rows)],
                        request_id=os.urandom(8).hex(), version="1",
                        deadline=time.time() + deadline)


async def answered(batcher: Batcher, deadline: float) -> str:
    """"ok", or the error code of a request to mlp/1."""
    try:
        await batcher.infer(request(deadline))
    except InfermeshError as exc:
        return exc.code
    return "ok"


class SteadyLoad:
    """`CLIENTS` loops, each sending the next request once the last is answered."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.outcomes: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._loops = [asyncio.create_task(self._loop()) for _ in range(CLIENTS)]

    async def _loop(self) -> None:
        while not self._stop.is_set():
            self.outcomes[await answered(self._batcher, 10.0)] += 1
            await asyncio.sleep(0.02)  # light load: a few tens of requests a second

    async def stop(self) -> Counter[str]:
        self._stop.set()
        await asyncio.gather(*self._loops)
        return self.outcomes


async def test_scale_one_two_one_under_load_fails_no_request(bed: Bed) -> None:
    await bed.scale(1)
    bed.fleet.ensure()
    bed.config.subscribe(bed.fleet.ensure)
    [first] = await wait_for(bed.serving, lambda pids: len(pids) == 1, timeout=START,
                             what="the first mlp worker to be ready")
    load = SteadyLoad(bed.batcher)
    try:
        await wait_for(lambda: load.outcomes["ok"], lambda ok: ok >= 20, timeout=30,
                       what=f"requests answered by one worker ({load.outcomes})")
        await bed.scale(2)
        [second] = await wait_for(lambda: bed.serving() - {first}, lambda new: len(new) == 1,
                                  timeout=START, what="the second worker to be ready")
        await wait_for(lambda: bed.rows_run_by(second), lambda rows: rows > 0, timeout=30,
                       what="the second worker to run a batch")
        [newest] = [c for c in bed.fleet.workers("mlp", "1") if c.pid == second]
        await bed.scale(1)
        await wait_for(lambda: newest.finished, timeout=60, what="the second worker to leave")
        assert bed.serving() == {first}
        ok = load.outcomes["ok"]
        await wait_for(lambda: load.outcomes["ok"], lambda now: now >= ok + 20, timeout=30,
                       what=f"requests answered after the scale-down ({load.outcomes})")
    finally:
        outcomes = await load.stop()
    assert set(outcomes) == {"ok"}, f"every request answered: {outcomes}"
    assert [c.pid for c in bed.fleet.workers("mlp", "1")] == [first]


async def test_a_request_at_zero_workers_is_held_until_one_starts(bed: Bed) -> None:
    await bed.scale(0)
    bed.fleet.ensure()
    bed.config.subscribe(bed.fleet.ensure)
    assert bed.fleet.workers("mlp", "1") == []
    sent = time.monotonic()
    held = asyncio.create_task(answered(bed.batcher, 20.0))
    await wait_for(bed.queued_rows, lambda rows: rows >= 1, timeout=10,
                   what="the request to wait in the batcher's queue")
    assert not held.done()
    await bed.scale(1)  # what the autoscaler does on seeing the queued row
    assert await held == "ok", "answered late, within its deadline, not refused"
    assert time.monotonic() - sent < 20
    assert len(bed.serving()) == 1
