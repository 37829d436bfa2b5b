"""The jobs' metrics as a scraper sees them at the gateway's /metrics: jobs created and
finished by status (each job once, however often it is cancelled), rows written, and the queue
depth the runner refreshes at every poll."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.jobs_app import JOBS, JobsApp, jobs_app, row
from tests.gateway.tenancy import add_tenant, bearer
from tests.waiting import wait_for


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[JobsApp]:
    async with jobs_app(database_url) as built:
        yield built


def _value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels}` of the exposition `text`; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def _submit(app: JobsApp, key: str, rows: int) -> str:
    response = await app.client.post(JOBS, json={"model": "echo",
                                                 "inputs": [row(i) for i in range(rows)]},
                                     headers=bearer(key))
    assert response.status == 202, await response.text()
    return response.headers["Location"]


async def test_jobs_created_finished_rows_and_queue_depth_reach_metrics(app: JobsApp) -> None:
    key = add_tenant(app.config, "acme")
    done, cancelled, other = [await _submit(app, key, n) for n in (20, 3, 5)]
    text = await app.metrics_text()
    assert _value(text, "infermesh_gateway_jobs_created_total", tenant="acme") == 3
    await app.runner.count_queued()
    assert _value(await app.metrics_text(), "infermesh_gateway_jobs_queued") == 3
    for _ in range(2):  # the second cancel changes nothing: the job finished once
        await app.client.delete(cancelled, headers=bearer(key))
    app.start_runner()
    for location in (done, other):
        assert (await app.finished(location, key))["status"] == "succeeded"
    # The runner's next poll finds the queue empty.
    text = await wait_for(app.metrics_text,
                          lambda t: _value(t, "infermesh_gateway_jobs_queued") == 0,
                          timeout=30, what="the queue-depth gauge at 0")
    assert _value(text, "infermesh_gateway_jobs_finished_total",
                  tenant="acme", status="succeeded") == 2
    assert _value(text, "infermesh_gateway_jobs_finished_total",
                  tenant="acme", status="cancelled") == 1
    assert _value(text, "infermesh_gateway_job_rows_total", tenant="acme", status="done") == 25
    assert _value(text, "infermesh_gateway_job_rows_total", tenant="acme", status="failed") == 0
