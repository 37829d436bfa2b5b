"""A gateway app serving `/v1/jobs` with every part on: uploaded job inputs, the disabled
webhook URLs, the metrics in a registry the test reads, and a runner not started yet. Shared by
the tests of job inputs, job metrics and job webhooks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.jobs import JobRecord, JobService
from services.gateway.jobs_inputs import JobInputs
from services.gateway.jobs_inputs_store import PostgresJobInputStore
from services.gateway.jobs_offload import Offload
from services.gateway.jobs_runner import GatewayRows, JobRunner
from services.gateway.jobs_store import open_job_store
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.infra.db import create_pool, migrate
from services.webhooks.endpoints import DisabledEndpoints
from services.webhooks.outbox import enqueue
from services.webhooks.signing import new_secret
from services.webhooks.targets import check_target_async
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import bearer
from tests.waiting import wait_for

Client = TestClient[Any, Any]
JOBS, INPUTS = "/v1/jobs", "/v1/job-inputs"
MAX_ROWS = 50


@dataclass
class JobsApp:
    client: Client
    runner: JobRunner
    router: EchoRouter
    config: StaticConfig
    metrics: GatewayMetrics
    stack: AsyncExitStack

    def start_runner(self) -> None:
        self.runner.start()
        self.stack.push_async_callback(self.runner.aclose)

    async def metrics_text(self) -> str:
        response = await self.client.get("/metrics")
        assert response.status == 200
        return await response.text()

    async def status(self, location: str, key: str) -> tuple[int, dict[str, Any]]:
        response = await self.client.get(location, headers=bearer(key), allow_redirects=False)
        return response.status, await response.json()

    async def finished(self, location: str, key: str) -> dict[str, Any]:
        """The job's status once it is no longer queued or running."""
        _, body = await wait_for(
            lambda: self.status(location, key),
            lambda got: got[1]["status"] in ("succeeded", "failed", "cancelled"),
            timeout=30, what=f"job {location} finished")
        return body


def row(i: int) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                        "data": [i, i + 0.5]}]}


@asynccontextmanager
async def jobs_app(
    database_url: str, *, retention_s: float = 3600.0, max_rows: int = MAX_ROWS,
    max_body_bytes: int = 1 << 16, offload: Offload | None = None,
) -> AsyncIterator[JobsApp]:
    """The app over a migrated database, parsing bodies through `offload` (None: inline);
    closed (runner, client, pool) on exit."""
    pool = await create_pool(database_url)
    await migrate(pool)
    await pool.close()
    config = echo_config()
    metrics = GatewayMetrics()

    def finished(record: JobRecord) -> None:
        metrics.jobs_finished.labels(record.tenant, record.status).inc()

    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            open_job_store(database_url, outbox=enqueue, on_finished=finished))
        router, access = EchoRouter(), Access(config)
        core = Gateway(ModelCatalog(config), router, access=access, metrics=metrics)
        runner = JobRunner(store, GatewayRows(core, access), lease_s=5.0, concurrency=4,
                           chunk_rows=8, poll_s=0.05, metrics=metrics)
        inputs = JobInputs(PostgresJobInputStore(store.pool), max_rows=max_rows,
                           retention_s=retention_s, offload=offload)
        service = JobService(core, access, store, max_rows=max_rows, retention_s=retention_s,
                             webhook_targets=check_target_async, new_secret=new_secret,
                             on_submitted=runner.wake, inputs=inputs,
                             webhook_endpoints=DisabledEndpoints(store.pool),
                             offload=offload)
        app = create_app(core, jobs=service, max_body_bytes=max_body_bytes)
        client = TestClient(TestServer(app))
        await client.start_server()
        stack.push_async_callback(client.close)
        yield JobsApp(client, runner, router, config, metrics, stack)
