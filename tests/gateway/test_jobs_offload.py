"""Large job bodies parsed and checked in a child process (jobs_offload.py), here with the
threshold at 0 so every body goes there: rows and 400 messages equal the inline path's, uploads
and `inputs_ref` jobs work through it, the process starts on the first large body and is gone
after close, and a killed child is a 503 with Retry-After, the next call served again."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from services.gateway.jobs_offload import Offload
from services.gateway.jobs_submission import (
    encode_inline_rows,
    encode_stored_rows,
    submission_fields,
)
from services.gateway.jobs_wiring import check_job_settings
from services.gateway.settings import GatewaySettings
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import InvalidInput, Unavailable
from services.mesh.domain.types import ModelVersion
from tests.gateway.echo import echo_config
from tests.gateway.jobs_app import INPUTS, JOBS, JobsApp, jobs_app, row
from tests.gateway.tenancy import add_tenant, bearer

WRONG = {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}


@pytest.fixture
async def offload() -> AsyncIterator[Offload]:
    every_body = Offload(max_inline_bytes=0)
    yield every_body
    await every_body.aclose()


@pytest.fixture
async def app(database_url: str, offload: Offload) -> AsyncIterator[JobsApp]:
    async with jobs_app(database_url, offload=offload) as built:
        yield built


def _spec() -> ModelVersion:
    return ModelCatalog(echo_config()).resolve("echo", None)


def _inline_error(raw: bytes) -> str:
    with pytest.raises(InvalidInput) as caught:
        encode_inline_rows(raw, _spec(), 50)
    return caught.value.message


def _children() -> set[int]:
    return {child.pid for child in multiprocessing.active_children() if child.pid is not None}


async def test_rows_checked_in_the_child_equal_the_inline_ones(offload: Offload) -> None:
    raw = orjson.dumps({"model": "echo", "version": "1", "inputs": [row(i) for i in range(10)]})
    spec = _spec()
    fields = await offload.run(submission_fields, raw, size=len(raw))
    assert fields == {"model": "echo", "version": "1"}
    rows = await offload.run(encode_inline_rows, raw, spec, 50, size=len(raw))
    assert rows == encode_inline_rows(raw, spec, 50)
    uploaded = [orjson.dumps(row(i)) for i in range(10)]
    stored = await offload.run(encode_stored_rows, uploaded, spec, 50, size=1)
    assert stored == rows


async def test_a_job_and_an_upload_through_the_child_give_the_inline_result(
    app: JobsApp,
) -> None:
    key = add_tenant(app.config, "acme")
    rows = [row(i) for i in range(6)]
    uploaded = await app.client.post(INPUTS, data=orjson.dumps(rows), headers=bearer(key))
    assert uploaded.status == 201, await uploaded.text()
    assert (await uploaded.json())["rows"] == 6
    outputs = []
    app.start_runner()
    for body in ({"model": "echo", "inputs": rows},
                 {"model": "echo", "inputs_ref": (await uploaded.json())["id"]}):
        response = await app.client.post(JOBS, json=body, headers=bearer(key))
        assert response.status == 202, await response.text()
        location = response.headers["Location"]
        assert (await app.finished(location, key))["status"] == "succeeded"
        result = await app.client.get(f"{location}/result", headers=bearer(key))
        outputs.append([o["outputs"] for o in (await result.json())["outputs"]])
    assert len(outputs[0]) == 6 and outputs[0] == outputs[1]


async def test_a_bad_row_in_the_middle_is_the_same_400_as_inline(app: JobsApp) -> None:
    key = add_tenant(app.config, "acme")
    rows: list[Any] = [row(i) for i in range(7)]
    rows[3] = WRONG
    raw = orjson.dumps({"model": "echo", "inputs": rows})
    expected = _inline_error(raw)
    assert expected.startswith("inputs[3]: ")
    response = await app.client.post(JOBS, data=raw, headers=bearer(key))
    assert response.status == 400
    assert (await response.json())["error"] == expected
    malformed = await app.client.post(JOBS, data=raw[:-1], headers=bearer(key))
    assert malformed.status == 400
    assert (await malformed.json())["error"].startswith("body: malformed JSON")
    bad_upload = await app.client.post(INPUTS, data=orjson.dumps([row(0), {"inputs": []}]),
                                       headers=bearer(key))
    assert bad_upload.status == 400
    assert (await bad_upload.json())["error"].startswith("inputs[1]: ")


async def test_an_uploaded_bad_row_is_a_400_naming_inputs_ref(app: JobsApp) -> None:
    key = add_tenant(app.config, "acme")
    uploaded = await app.client.post(INPUTS, data=orjson.dumps([row(0), WRONG]),
                                     headers=bearer(key))
    assert uploaded.status == 201, await uploaded.text()
    response = await app.client.post(
        JOBS, json={"model": "echo", "inputs_ref": (await uploaded.json())["id"]},
        headers=bearer(key))
    assert response.status == 400
    assert (await response.json())["error"].startswith("inputs_ref[1]: ")


async def test_the_process_starts_on_the_first_large_input_and_is_gone_after_close() -> None:
    offload = Offload(max_inline_bytes=100)
    before = _children()
    try:
        assert await offload.run(os.getpid, size=100) == os.getpid()
        assert _children() == before, "a small input started a process"
        child = await offload.run(os.getpid, size=101)
        assert child != os.getpid() and child in _children() - before
        assert await offload.run(os.getpid, size=101) == child, "the process is reused"
    finally:
        await offload.aclose()
    assert child not in _children()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    with pytest.raises(Unavailable):
        await offload.run(os.getpid, size=101)


async def test_a_killed_child_is_a_503_and_the_next_job_is_served(
    app: JobsApp, offload: Offload
) -> None:
    key = add_tenant(app.config, "acme")
    child = await offload.run(os.getpid, size=1)
    os.kill(child, signal.SIGKILL)
    body = {"model": "echo", "inputs": [row(0), row(1)]}
    response = await app.client.post(JOBS, json=body, headers=bearer(key))
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert "parsing process died" in (await response.json())["error"]
    again = await app.client.post(JOBS, json=body, headers=bearer(key))
    assert again.status == 202, await again.text()
    assert await offload.run(os.getpid, size=1) not in (child, os.getpid())


@pytest.mark.parametrize(("changed", "named"), [
    ({"job_offload_bytes": -1}, "INFERMESH_GATEWAY_JOB_OFFLOAD_BYTES: must be >= 0"),
    ({"job_offload_processes": 0}, "INFERMESH_GATEWAY_JOB_OFFLOAD_PROCESSES: must be > 0"),
])
def test_offload_settings_out_of_range_fail_at_start(changed: dict[str, int], named: str) -> None:
    check_job_settings(GatewaySettings(job_offload_bytes=0))
    with pytest.raises(InvalidInput, match=named):
        check_job_settings(GatewaySettings(**changed))  # type: ignore[arg-type]
