"""The gateway as `python -m services.gateway` builds it (`build_gateway`) with a database:
`/v1/jobs`, `/v1/job-inputs` and `/v1/webhooks/disabled` are served, the jobs' and
webhooks' metrics are in its /metrics from the start, and the process parsing large job bodies
is gone once the gateway is closed."""

from __future__ import annotations

import multiprocessing
from contextlib import AsyncExitStack
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.gateway.settings import GatewaySettings
from services.gateway.wiring import build_gateway
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra.db import create_pool, migrate
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import add_tenant, bearer


async def test_the_built_gateway_serves_uploads_and_disabled_webhooks(database_url: str) -> None:
    pool = await create_pool(database_url)
    await migrate(pool)
    await pool.close()
    config = echo_config()
    key = add_tenant(config, "acme")
    settings = GatewaySettings(database_url=database_url, grpc_port=0, host="127.0.0.1",
                               job_offload_bytes=0)
    before = _children()
    async with AsyncExitStack() as stack:
        gateway = await build_gateway(settings, stack, catalog=ModelCatalog(config),
                                      router=EchoRouter(), registry=CollectorRegistry())
        client: TestClient[Any, Any] = TestClient(TestServer(gateway.app))
        await client.start_server()
        stack.push_async_callback(client.close)
        uploaded = await client.post("/v1/job-inputs", headers=bearer(key), json=[
            {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                         "data": [1, 2]}]}])
        assert uploaded.status == 201, await uploaded.text()
        assert _children() - before, "the upload was not parsed in a child process"
        job = await client.post("/v1/jobs", headers=bearer(key), json={
            "model": "echo", "inputs_ref": (await uploaded.json())["id"]})
        assert job.status == 202, await job.text()
        disabled = await client.get("/v1/webhooks/disabled", headers=bearer(key))
        assert (await disabled.json()) == {"disabled": []}
        text = await (await client.get("/metrics")).text()
        for name in ("infermesh_gateway_jobs_created_total{tenant=\"acme\"} 1.0",
                     "infermesh_webhook_deliveries_total{outcome=\"gone\"} 0.0",
                     "infermesh_webhook_attempt_seconds_count", "infermesh_gateway_jobs_queued"):
            assert name in text, name
    assert _children() == before


def _children() -> set[int]:
    return {child.pid for child in multiprocessing.active_children() if child.pid is not None}
