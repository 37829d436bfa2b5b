"""A 10,000-row job survives kill -9 of the process running it: submitted through the REST
API (202), run by a runner in a subprocess that is SIGKILLed midway, taken over by another
runner once the lease expires, and finished (303) with every row's output stored exactly once
and no row that the killed runner had written executed again."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.jobs import JobService
from services.gateway.jobs_runner import GatewayRows, JobRunner
from services.gateway.jobs_store import open_job_store
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra.db import create_pool, migrate
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import add_tenant, bearer
from tests.integration import jobs_runner_proc as proc
from tests.waiting import wait_for

ROWS = 10_000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url)
    await migrate(pool)
    yield pool
    await pool.close()


def _row(i: int) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                        "data": [i, i + 0.5]}]}


def _executed(router: EchoRouter) -> list[int]:
    """The first feature of every row the router ran (a request may carry a pack of rows)."""
    return [int(first) for r in router.seen
            for first in np.frombuffer(r.inputs[0].data, dtype=np.float32)[::2]]


@pytest.mark.timeout(120)
async def test_a_job_survives_kill_9_of_its_runner_with_every_row_once(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    config = echo_config()
    key = add_tenant(config, "acme")
    router, access = EchoRouter(), Access(config)
    core = Gateway(ModelCatalog(config), router, access=access,
                   metrics=GatewayMetrics(CollectorRegistry()))
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_job_store(database_url))
        service = JobService(core, access, store, max_rows=ROWS)
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(core, jobs=service)))
        await client.start_server()
        stack.push_async_callback(client.close)
        response = await client.post("/v1/jobs", headers=bearer(key), json={
            "model": "echo", "inputs": [_row(i) for i in range(ROWS)]})
        assert response.status == 202
        location = response.headers["Location"]

        async def progress() -> tuple[int, dict[str, Any]]:
            got = await client.get(location, headers=bearer(key), allow_redirects=False)
            return got.status, await got.json()

        executions = tmp_path / "executions"
        killed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.jobs_runner_proc", database_url,
            str(executions), cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            status, body = await wait_for(
                progress, lambda got: got[1]["progress"]["done"] >= 1000, timeout=60,
                what="the subprocess runner to write 1000 rows")
        finally:
            killed.kill()  # SIGKILL: no cleanup, no lease released
            await killed.communicate()
        assert status == 200 and body["status"] == "running", "killed midway"
        written_before = {r["idx"] for r in await pool.fetch(
            "SELECT idx FROM job_rows WHERE status = 'done'")}
        assert 1000 <= len(written_before) < ROWS

        runner = JobRunner(store, GatewayRows(core, access), lease_s=proc.LEASE_S,
                           concurrency=64, chunk_rows=proc.CHUNK_ROWS, poll_s=0.05)
        runner.start()
        stack.push_async_callback(runner.aclose)
        status, body = await wait_for(progress, lambda got: got[0] == 303, timeout=60,
                                      what="the job to finish after the takeover")
        assert body["progress"] == {"done": ROWS, "failed": 0, "total": ROWS}
        result = await (await client.get(f"{location}/result", headers=bearer(key))).json()

    outputs = result["outputs"]
    assert [o["outputs"][0]["data"] for o in outputs] == [[i, i + 0.5] for i in range(ROWS)]
    assert await pool.fetchval("SELECT count(*) FROM job_rows WHERE status = 'done'") == ROWS
    by_killed = [int(line) for line in (await asyncio.to_thread(executions.read_text)).split()]
    by_taker = _executed(router)
    assert not set(by_taker) & written_before, "a row written before the kill ran again"
    counts = Counter(by_killed + by_taker)
    assert set(counts) == set(range(ROWS))
    # Only rows in flight or awaiting their chunk's write at the kill ran twice.
    twice = [idx for idx, n in counts.items() if n > 1]
    assert all(counts[idx] == 2 for idx in twice)
    assert len(twice) <= 2 * proc.CHUNK_ROWS + proc.ROWS_IN_FLIGHT
