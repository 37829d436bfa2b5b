"""`/v1/jobs` through the REST adapter over a real gateway core, a real Postgres and the job
runner, with an echoing router as the next hop: a job walks 202 -> 303 and its result equals
single calls, rows go in the bulk lane as the tenant, cancel stops it, another tenant sees 404,
and bad submissions are 400s naming the field."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.jobs import JobService, JobStore
from services.gateway.jobs_runner import GatewayRows, JobRunner
from services.gateway.jobs_store import open_job_store
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import ModelFailed
from services.mesh.domain.types import InferRequest, InferResponse
from services.mesh.infra.db import create_pool, migrate
from services.webhooks.signing import new_secret
from services.webhooks.targets import check_target_async
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import add_tenant, bearer
from tests.waiting import wait_for

Client = TestClient[Any, Any]
JOBS = "/v1/jobs"


@dataclass
class Jobs:
    client: Client
    runner: JobRunner
    router: EchoRouter
    config: StaticConfig
    stack: AsyncExitStack
    core: Gateway
    store: JobStore

    def start_runner(self) -> None:
        self.runner.start()
        self.stack.push_async_callback(self.runner.aclose)


@pytest.fixture
async def jobs(database_url: str) -> AsyncIterator[Jobs]:
    """A gateway app with `/v1/jobs` over a migrated database; its runner not started."""
    pool = await create_pool(database_url)
    await migrate(pool)
    await pool.close()
    config = echo_config()
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_job_store(database_url))
        router, access = EchoRouter(), Access(config)
        core = Gateway(ModelCatalog(config), router, access=access,
                       metrics=GatewayMetrics(CollectorRegistry()))
        runner = JobRunner(store, GatewayRows(core, access), lease_s=5.0, concurrency=4,
                           chunk_rows=8, poll_s=0.05)
        service = JobService(core, access, store, max_rows=50,
                             webhook_targets=check_target_async, new_secret=new_secret,
                             on_submitted=runner.wake)
        client = TestClient(TestServer(create_app(core, jobs=service)))
        await client.start_server()
        stack.push_async_callback(client.close)
        yield Jobs(client, runner, router, config, stack, core, store)


def _row(i: int) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                        "data": [i, i + 0.5]}]}


async def _submit(jobs: Jobs, key: str, rows: int) -> str:
    response = await jobs.client.post(
        JOBS, json={"model": "echo", "inputs": [_row(i) for i in range(rows)]},
        headers=bearer(key))
    assert response.status == 202, await response.text()
    assert response.headers["Retry-After"] == "1"
    location = response.headers["Location"]
    body = await response.json()
    assert location == f"{JOBS}/{body['id']}"
    assert body["status"] == "queued"
    assert body["progress"] == {"done": 0, "failed": 0, "total": rows}
    return location


async def _status(jobs: Jobs, location: str, key: str) -> tuple[int, dict[str, Any]]:
    response = await jobs.client.get(location, headers=bearer(key), allow_redirects=False)
    return response.status, await response.json()


async def test_a_job_walks_202_to_303_and_its_result_equals_single_calls(jobs: Jobs) -> None:
    key = add_tenant(jobs.config, "acme")
    location = await _submit(jobs, key, 20)
    jobs.start_runner()
    status, body = await wait_for(lambda: _status(jobs, location, key),
                                  lambda got: got[0] == 303, timeout=30, what="job done")
    assert body["status"] == "succeeded"
    assert body["progress"] == {"done": 20, "failed": 0, "total": 20}
    response = await jobs.client.get(location, headers=bearer(key))  # follows the 303
    assert response.status == 200
    assert str(response.url).endswith(f"{location}/result")
    result = await response.json()
    assert len(result["outputs"]) == 20
    assert all(r.lane == "bulk" and r.tenant == "acme" for r in jobs.router.seen)
    for i, served in enumerate(result["outputs"]):
        single = await jobs.client.post("/v2/models/echo/infer", json=_row(i),
                                        headers=bearer(key))
        expected = await single.json()
        assert served["outputs"] == expected["outputs"]
        assert served["model_version"] == expected["model_version"]


async def test_a_job_rests_in_proportion_to_its_requests_only_while_realtime_requests_arrive(
    jobs: Jobs,
) -> None:
    """jobs_pacing.py: at duty 0.5 each request of the job is followed by a rest as long as it
    took (the fake clock makes each take 10 ms), and never while no realtime request came in
    the last second; the gateway notes realtime requests, never the job's own bulk ones."""
    key = add_tenant(jobs.config, "acme")
    ticks = iter(range(1_000_000))
    rests: list[float] = []

    async def rest(seconds: float) -> None:
        rests.append(seconds)
        await asyncio.sleep(0)

    ages = [0.5]  # a realtime request half a second ago
    jobs.runner = JobRunner(jobs.store, GatewayRows(jobs.core, Access(jobs.config)), lease_s=5.0,
                            concurrency=1, pack_rows=1, chunk_rows=8, poll_s=0.05, duty=0.5,
                            realtime_age=lambda: ages[0], clock=lambda: next(ticks) * 0.005,
                            sleep=rest)
    jobs.start_runner()
    for rows, age, expected in ((6, 0.5, [0.005] * 6), (4, 1.5, [])):
        ages[0], rests[:] = age, []
        location = await _submit(jobs, key, rows)
        jobs.runner.wake()
        await wait_for(functools.partial(_status, jobs, location, key),
                       lambda got: got[0] == 303, timeout=30, what="job done")
        assert rests == pytest.approx(expected), f"realtime {age} s ago"
    assert jobs.core.realtime_age() == float("inf"), "the job's bulk requests are not realtime"
    response = await jobs.client.post("/v2/models/echo/infer", json=_row(0), headers=bearer(key))
    assert response.status == 200
    assert 0 <= jobs.core.realtime_age() < 60


async def test_rows_travel_packed_and_only_the_row_the_model_fails_on_fails(
    jobs: Jobs,
) -> None:
    """Rows alike share a request (jobs_packing.py), one quota token per row; a row of another
    shape travels alone; when the model fails on a pack, its rows run alone and only the row
    at fault fails."""
    key = add_tenant(jobs.config, "acme")
    echo = jobs.router.infer

    async def fails_on_13(request: InferRequest) -> InferResponse:
        if (request.inputs[0].array() == 13).any():
            raise ModelFailed("the model cannot take 13")
        return await echo(request)

    jobs.router.infer = fails_on_13  # type: ignore[method-assign]
    rows = [_row(i) for i in range(20)]
    rows[5] = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3],
                           "data": [5, 5, 5]}]}
    response = await jobs.client.post(JOBS, json={"model": "echo", "inputs": rows},
                                      headers=bearer(key))
    assert response.status == 202, await response.text()
    location = response.headers["Location"]
    jobs.start_runner()
    _, body = await wait_for(lambda: _status(jobs, location, key),
                             lambda got: got[0] == 303, timeout=30, what="job done")
    assert body["progress"] == {"done": 19, "failed": 1, "total": 20}
    result = await (await jobs.client.get(f"{location}/result", headers=bearer(key))).json()
    for i, served in enumerate(result["outputs"]):
        if i == 13:
            assert served == {"error": "the model cannot take 13", "code": ModelFailed.code}
            continue
        assert served["id"] == f"{location.rsplit('/', 1)[1]}-{i}"
        assert served["outputs"][0]["data"] == rows[i]["inputs"][0]["data"]
    sizes = [r.rows for r in jobs.router.seen]
    assert max(sizes) > 1, f"no row was packed: {sizes}"
    assert [r.inputs[0].shape for r in jobs.router.seen].count((1, 3)) == 1


async def test_a_pack_carries_no_more_rows_than_the_tenants_burst(jobs: Jobs) -> None:
    """A pack takes a rate token per row: one larger than the burst would leave the bucket in
    debt, holding the tenant's realtime requests behind it."""
    key = add_tenant(jobs.config, "acme", rate=1000.0, burst=3)
    location = await _submit(jobs, key, 12)
    jobs.start_runner()
    _, body = await wait_for(lambda: _status(jobs, location, key),
                             lambda got: got[0] == 303, timeout=30, what="job done")
    assert body["progress"] == {"done": 12, "failed": 0, "total": 12}
    sizes = [r.rows for r in jobs.router.seen]
    assert max(sizes) == 3 and sum(sizes) == 12, sizes


async def test_a_cancelled_job_runs_no_row_and_has_no_result(jobs: Jobs) -> None:
    key = add_tenant(jobs.config, "acme")
    location = await _submit(jobs, key, 5)
    response = await jobs.client.delete(location, headers=bearer(key))
    assert response.status == 200
    assert (await response.json())["status"] == "cancelled"
    assert not await jobs.runner.run_one()  # nothing runnable
    assert jobs.router.seen == []
    status, body = await _status(jobs, location, key)
    assert (status, body["status"]) == (200, "cancelled")
    result = await jobs.client.get(f"{location}/result", headers=bearer(key))
    assert result.status == 404
    again = await jobs.client.delete(location, headers=bearer(key))
    assert again.status == 200  # cancelling twice is harmless


async def test_another_tenant_sees_404_for_the_job(jobs: Jobs) -> None:
    owner, other = add_tenant(jobs.config, "acme"), add_tenant(jobs.config, "globex")
    location = await _submit(jobs, owner, 2)
    for method, path in (("GET", location), ("GET", f"{location}/result"),
                         ("DELETE", location)):
        response = await jobs.client.request(method, path, headers=bearer(other))
        assert response.status == 404, (method, path)
    status, body = await _status(jobs, location, owner)
    assert (status, body["status"]) == (200, "queued")


@pytest.mark.parametrize(("body", "field"), [
    ({"inputs": [_row(0)]}, "model:"),
    ({"model": "echo", "inputs": []}, "inputs:"),
    ({"model": "echo", "inputs": [_row(0)] * 51}, "inputs: 51 rows, at most 50"),
    ({"model": "echo", "inputs": [_row(0), {"inputs": [{"name": "nope", "datatype": "FP32",
                                                         "shape": [1, 2], "data": [1, 2]}]}]},
     "inputs[1]:"),
    ({"model": "echo", "inputs": [_row(0)], "priority": 1}, "priority: unknown field"),
    ({"model": "echo", "inputs": [_row(0)], "webhook": "http://x"}, "webhook:"),
    ({"model": "echo", "inputs": [_row(0)], "webhook": {"url": "http://127.0.0.1:9/hook"}},
     "webhook.url"),
])
async def test_bad_submissions_are_400s_naming_the_field(
    jobs: Jobs, body: dict[str, Any], field: str
) -> None:
    key = add_tenant(jobs.config, "acme")
    response = await jobs.client.post(JOBS, json=body, headers=bearer(key))
    assert response.status == 400
    assert field in (await response.json())["error"]


async def test_jobs_need_a_key_and_a_model_the_tenant_may_use(jobs: Jobs) -> None:
    body = {"model": "echo", "inputs": [_row(0)]}
    assert (await jobs.client.post(JOBS, json=body)).status == 401
    key = add_tenant(jobs.config, "acme", allowed_models=["pair"])
    assert (await jobs.client.post(JOBS, json=body, headers=bearer(key))).status == 403
    unknown = {"model": "nope", "inputs": [_row(0)]}
    key = add_tenant(jobs.config, "globex")
    assert (await jobs.client.post(JOBS, json=unknown, headers=bearer(key))).status == 404


async def test_finished_jobs_are_swept_after_their_retention(
    jobs: Jobs, database_url: str
) -> None:
    key = add_tenant(jobs.config, "acme")
    location = await _submit(jobs, key, 1)
    await jobs.client.delete(location, headers=bearer(key))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE jobs SET expires_at = now() - interval '1 second'")
    finally:
        await conn.close()
    jobs.start_runner()  # sweeps at start
    await wait_for(lambda: _status(jobs, location, key), lambda got: got[0] == 404,
                   timeout=30, what="job swept")
