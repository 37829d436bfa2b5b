"""Building the gateway's async jobs from its settings: the stores, the service behind
`/v1/jobs` (with `/v1/job-inputs` and `/v1/webhooks/disabled`), and the runner task (see
jobs.py for why jobs run inside the gateway)."""

from __future__ import annotations

import contextlib

from services.gateway.access import Access
from services.gateway.core import Gateway
from services.gateway.jobs import JobRecord, JobService
from services.gateway.jobs_inputs import JobInputs
from services.gateway.jobs_inputs_store import PostgresJobInputStore
from services.gateway.jobs_offload import Offload
from services.gateway.jobs_runner import GatewayRows, JobRunner
from services.gateway.jobs_store import open_job_store
from services.gateway.settings import GatewaySettings
from services.mesh.domain.errors import InvalidInput
from services.webhooks.endpoints import DisabledEndpoints
from services.webhooks.outbox import enqueue
from services.webhooks.signing import new_secret
from services.webhooks.targets import check_target_async


async def open_jobs(
    settings: GatewaySettings, stack: contextlib.AsyncExitStack, *, core: Gateway,
    access: Access,
) -> JobService | None:
    """The job service per `settings` (None without a database), its runner started when
    `job_runner` is on; closed through `stack` (the runner first, then the pool, then the
    process parsing large bodies if one was started). The job settings are checked first,
    database or not: a bad one fails at start."""
    check_job_settings(settings)
    if not settings.database_url:
        return None
    offload = Offload(max_inline_bytes=settings.job_offload_bytes,
                      processes=settings.job_offload_processes)
    stack.push_async_callback(offload.aclose)

    def finished(record: JobRecord) -> None:
        core.metrics.jobs_finished.labels(record.tenant, record.status).inc()

    store = await stack.enter_async_context(
        open_job_store(settings.database_url, outbox=enqueue, on_finished=finished))
    runner: JobRunner | None = None
    if settings.job_runner:
        runner = JobRunner(
            store, GatewayRows(core, access), lease_s=settings.job_lease_s,
            concurrency=settings.job_concurrency, pack_rows=settings.job_pack_rows,
            retention_s=settings.job_retention_s,
            metrics=core.metrics, duty=settings.job_duty, realtime_age=core.realtime_age,
        )
        runner.start()
        stack.push_async_callback(runner.aclose)
    return JobService(
        core, access, store, max_rows=settings.job_max_rows,
        retention_s=settings.job_retention_s, webhook_targets=check_target_async,
        new_secret=new_secret,
        on_submitted=runner.wake if runner is not None else None,
        inputs=JobInputs(PostgresJobInputStore(store.pool, timeout=settings.database_timeout),
                         max_rows=settings.job_max_rows, retention_s=settings.job_retention_s,
                         offload=offload),
        webhook_endpoints=DisabledEndpoints(store.pool, timeout=settings.database_timeout),
        offload=offload,
    )


def check_job_settings(settings: GatewaySettings) -> None:
    """InvalidInput naming the first job setting out of its range."""
    bounds = {"job_lease_s": settings.job_lease_s, "job_concurrency": settings.job_concurrency,
              "job_pack_rows": settings.job_pack_rows,
              "job_retention_s": settings.job_retention_s, "job_max_rows": settings.job_max_rows,
              "job_offload_processes": settings.job_offload_processes}
    for name, value in bounds.items():
        if not value > 0:
            raise InvalidInput(f"setting INFERMESH_GATEWAY_{name.upper()}: must be > 0, "
                               f"not {value}")
    if not 0 < settings.job_duty <= 1:
        raise InvalidInput("setting INFERMESH_GATEWAY_JOB_DUTY: must be within (0, 1], "
                           f"not {settings.job_duty}")
    if settings.job_offload_bytes < 0:
        raise InvalidInput("setting INFERMESH_GATEWAY_JOB_OFFLOAD_BYTES: must be >= 0, "
                           f"not {settings.job_offload_bytes}")
