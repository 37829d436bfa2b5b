"""A gateway job runner in a process of its own, for test_jobs_crash to SIGKILL mid-job.

`python -m tests.integration.jobs_runner_proc DSN EXECUTIONS` runs jobs of tenant `acme` on
model `echo` until killed. Its router echoes each request after a short pause per row (so
the kill lands midway) and first appends each row's first feature value to EXECUTIONS with
one `os.write` per request (a request may carry a pack of rows): what the process executed
survives its SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import AsyncExitStack

import numpy as np
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.core import Gateway
from services.gateway.jobs_runner import GatewayRows, JobRunner
from services.gateway.jobs_store import open_job_store
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.types import InferRequest, InferResponse
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import add_tenant

PAUSE_S = 0.003
CONCURRENCY = 8
ROWS_IN_FLIGHT = CONCURRENCY * 8
"""Each of CONCURRENCY requests packs at most the echo model's max_batch_size (8) rows."""
CHUNK_ROWS = 100
LEASE_S = 1.0


class RecordingRouter(EchoRouter):
    """An echo router that records each execution in a file, then answers a little later."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    async def infer(self, request: InferRequest) -> InferResponse:
        firsts = np.frombuffer(request.inputs[0].data, dtype=np.float32)[::2]
        os.write(self._fd, b"".join(b"%d\n" % int(first) for first in firsts))
        await asyncio.sleep(PAUSE_S * request.rows)  # packed or not, the same pace in rows
        return await super().infer(request)


async def main(dsn: str, executions: str) -> None:
    config = echo_config()
    add_tenant(config, "acme")
    fd = os.open(executions, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    access = Access(config)
    core = Gateway(ModelCatalog(config), RecordingRouter(fd), access=access,
                   metrics=GatewayMetrics(CollectorRegistry()))
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_job_store(dsn))
        runner = JobRunner(store, GatewayRows(core, access), lease_s=LEASE_S,
                           concurrency=CONCURRENCY, chunk_rows=CHUNK_ROWS, poll_s=0.05)
        runner.start()
        stack.push_async_callback(runner.aclose)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
