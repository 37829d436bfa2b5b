"""The autoscaling loop end to end on a real local mesh (issue 17, acceptance): `infermesh up`
with every service a process, the control API's autoscaler scraping the real batcher's
/metrics and writing `scale/mlp/1`, and the launcher's fleet starting and draining workers.

The mlp's worker is made slow and CPU-independent with the `worker.run_batch=sleep:50`
failpoint and a max batch size of 1: one worker serves ~20 requests/s, so on a busy 2-core
machine more workers really add capacity. The version opts in through the registry
(`PATCH .../autoscaling`, the path a user takes) with short windows so the file runs in about
two minutes on a busy machine.

1. A ramp to ~2.25 workers' worth of open load raises the worker count, and the batcher's
   queue wait falls once the workers are in; after the load stops the count returns to 1;
   every request gets 200; `scale_decisions` holds the decisions with their reasons.
2. Scale-to-zero: with `min_replicas` 0 the last worker leaves when idle, and the first request
   after that is answered (late, within its 30 s deadline), not refused.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.registry_client import RegistryClient
from deploy.localdeps import LocalEtcd, LocalPostgres
from services.mesh.infra.credentials import MeshCredential
from services.mesh.infra.etcd import connect_client
from tests.integration.conftest import RunningMesh, mesh_on_session_deps
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

START = 90.0
"""Seconds a worker may take to start and warm up on a busy 2-core machine."""
PEAK_RATE = 45.0
"""Requests/s at the top of the ramp: ~2.25 workers' worth at 50 ms a request."""
RAMP_SECONDS = 8.0
SCALING = {"min_replicas": 1, "max_replicas": 3, "panic_window": 2, "stable_window": 6,
           "downscale_delay": 4, "startup_seconds": 5, "target_wait": 0.1,
           "rows_per_replica": 18}
"""mlp/1's autoscaling block: short windows; the capacity a 50 ms worker has, given."""
QUEUE_WAIT = "infermesh_inference_queue_duration_seconds"


@pytest.fixture(scope="module")
def mesh(local_etcd: LocalEtcd, local_postgres: LocalPostgres,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    with mesh_on_session_deps(
        "autoscale", local_etcd, local_postgres, tmp_path_factory,
        INFERMESH_GATEWAY_AUTH="0", INFERMESH_FAILPOINTS="worker.run_batch=sleep:50",
        INFERMESH_CONTROL_AUTOSCALER_INTERVAL="0.5",
    ) as running:
        yield running


class Mesh:
    """What the tests read and change in the running mesh."""

    def __init__(self, mesh: RunningMesh, session: aiohttp.ClientSession,
                 registry: RegistryClient) -> None:
        self.mesh = mesh
        self.session = session
        self.registry = registry
        self._etcd = connect_client(mesh.env["INFERMESH_ETCD_URL"])

    async def aclose(self) -> None:
        await self._etcd.close()

    async def records(self, sub: str) -> list[dict[str, Any]]:
        found = await self._etcd.get_prefix(f"{self.mesh.prefix}{sub}".encode())
        return [orjson.loads(kv.value) for kv in found]

    async def mlp_workers(self) -> int:
        """Ready mlp/1 workers (published, not draining)."""
        return sum(1 for r in await self.records("endpoints/worker/")
                   if "mlp/1" in r.get("models", ()) and not r.get("draining"))

    async def queue_wait(self) -> tuple[float, float]:
        """(sum, count) of the batchers' queue wait histogram for mlp/1."""
        total = count = 0.0
        for record in await self.records("endpoints/batcher/"):
            async with self.session.get(f"{record['http']}/metrics") as response:
                text = await response.text()  # no mesh credential: /metrics is open
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.labels.get("model") != "mlp":
                        continue
                    if sample.name == f"{QUEUE_WAIT}_sum":
                        total += sample.value
                    elif sample.name == f"{QUEUE_WAIT}_count":
                        count += sample.value
        return total, count

    async def infer(self, timeout: float) -> int:
        rows = np.random.default_rng().random((1, 32), dtype=np.float32)
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 32],
                            "data": rows.ravel().tolist()}]}
        async with self.session.post(
            f"{self.mesh.gateway}/v2/models/mlp/infer", json=body,
            headers={"X-Request-Timeout": str(timeout)},
            timeout=aiohttp.ClientTimeout(total=timeout + 15),
        ) as response:
            await response.read()
            return response.status


@pytest.fixture
async def live(mesh: RunningMesh) -> AsyncIterator[Mesh]:
    credential = await asyncio.to_thread(MeshCredential.load,
                                         mesh.env["INFERMESH_MESH_CREDENTIAL_FILE"])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        handle = Mesh(mesh, session, RegistryClient(session, mesh.registry,
                                                    credential=credential))
        try:
            yield handle
        finally:
            await handle.aclose()


class OpenLoad:
    """Requests at `rate(seconds since start)` per second, each on its own task (an open
    load: a slow answer does not slow the sender), until stopped."""

    def __init__(self, live: Mesh, rate: Any, timeout: float) -> None:
        self.statuses: Counter[int | str] = Counter()
        self._live, self._rate, self._timeout = live, rate, timeout
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        started = last = time.monotonic()
        credit = 0.0
        while not self._stop.is_set():
            await asyncio.sleep(0.02)
            now = time.monotonic()
            credit += self._rate(now - started) * (now - last)
            last = now
            while credit >= 1:
                credit -= 1
                task = asyncio.create_task(self._one())
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _one(self) -> None:
        try:
            self.statuses[await self._live.infer(self._timeout)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.statuses[type(exc).__name__] += 1

    async def stop(self) -> Counter[int | str]:
        self._stop.set()
        await self._sender
        await asyncio.gather(*self._inflight)
        return self.statuses


class WaitProbe:
    """The batcher's mean queue wait of mlp/1 over each ~1 s interval, with the worker count."""

    def __init__(self, live: Mesh) -> None:
        self.samples: list[tuple[int, float]] = []
        self._live = live
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        last = await self._live.queue_wait()
        while True:
            await asyncio.sleep(1.0)
            now = await self._live.queue_wait()
            served = now[1] - last[1]
            if served > 0:
                self.samples.append((await self._live.mlp_workers(),
                                     (now[0] - last[0]) / served))
            last = now

    def peak(self) -> float:
        return max((wait for _, wait in self.samples), default=0.0)

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_a_ramp_scales_up_the_wait_falls_and_the_count_returns_to_one(
    live: Mesh,
) -> None:
    await live.registry.change_batching("mlp", "1", {"max_batch_size": 1})
    await live.registry.change_autoscaling("mlp", "1", SCALING)
    assert await live.mlp_workers() == 1
    load = OpenLoad(live, lambda t: PEAK_RATE * min(1.0, 0.3 + t / RAMP_SECONDS), timeout=15)
    probe = WaitProbe(live)
    try:
        await wait_for(live.mlp_workers, lambda n: n >= 2, timeout=START,
                       what="a second mlp worker to be ready")
        await wait_for(probe.peak, lambda peak: peak > SCALING["target_wait"], timeout=30,
                       what="the queue wait to exceed the target (the load is above one worker)")
        peak = probe.peak()
        await wait_for(lambda: probe.samples[-1], lambda s: s[0] >= 2 and s[1] < peak / 2,
                       timeout=START, what=f"the queue wait to fall from its peak {peak:.3f} s")
    finally:
        statuses = await load.stop()
        await probe.aclose()
    assert set(statuses) == {200}, f"every request answered: {statuses}"
    await wait_for(live.mlp_workers, lambda n: n == 1, timeout=START,
                   what="the mlp worker count back to its minimum of 1")
    conn = await asyncpg.connect(live.mesh.env["INFERMESH_DATABASE_URL"])
    try:
        rows = await conn.fetch("SELECT previous, desired, reason FROM scale_decisions "
                                "WHERE model = 'mlp' AND version = '1' ORDER BY id")
    finally:
        await conn.close()
    assert any(r["desired"] > r["previous"] for r in rows), rows
    assert any(r["desired"] < r["previous"] for r in rows), rows
    assert all(r["reason"] for r in rows), rows


async def test_the_first_request_after_zero_is_answered_not_refused(live: Mesh) -> None:
    await live.registry.change_autoscaling(
        "mlp", "1", {**SCALING, "min_replicas": 0, "scale_to_zero": True, "idle_to_zero": 2})
    await wait_for(live.mlp_workers, lambda n: n == 0, timeout=60,
                   what="the idle mlp/1 to scale to zero workers")
    assert await live.infer(timeout=30) == 200, "answered late, within its deadline"
    assert await live.mlp_workers() == 1
