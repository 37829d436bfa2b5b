"""Jobs by reference: rows uploaded once to `/v1/job-inputs` (a JSON array or NDJSON), named
by `inputs_ref` in `POST /v1/jobs`. The upload is the tenant's alone, its sha256 is the body's,
bad rows and too many rows are 400s naming them, a body past the limit is a 413, and a job made
from an upload gives the same result as the same rows inline."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from tests.gateway.jobs_app import INPUTS, JOBS, MAX_ROWS, JobsApp, jobs_app, row
from tests.gateway.tenancy import add_tenant, bearer
from tests.waiting import wait_for

NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[JobsApp]:
    async with jobs_app(database_url) as built:
        yield built


async def _upload(app: JobsApp, key: str, body: bytes, **headers: str) -> dict[str, Any]:
    response = await app.client.post(INPUTS, data=body, headers={
        **bearer(key), "Content-Type": "application/json", **headers})
    assert response.status == 201, await response.text()
    uploaded: dict[str, Any] = await response.json()
    assert response.headers["Location"] == f"{INPUTS}/{uploaded['id']}"
    return uploaded


async def _result(app: JobsApp, key: str, body: dict[str, Any]) -> list[Any]:
    response = await app.client.post(JOBS, json=body, headers=bearer(key))
    assert response.status == 202, await response.text()
    location = response.headers["Location"]
    assert (await app.finished(location, key))["status"] == "succeeded"
    result = await app.client.get(f"{location}/result", headers=bearer(key))
    outputs: list[Any] = (await result.json())["outputs"]
    return outputs


async def test_a_job_over_uploaded_rows_equals_the_same_rows_inline(app: JobsApp) -> None:
    key = add_tenant(app.config, "acme")
    rows = [row(i) for i in range(12)]
    body = b"\n".join(orjson.dumps(r) for r in rows) + b"\n"
    uploaded = await _upload(app, key, body, **NDJSON)
    assert uploaded["rows"] == 12 and uploaded["bytes"] == len(body)
    assert uploaded["sha256"] == hashlib.sha256(body).hexdigest()
    shown = await app.client.get(f"{INPUTS}/{uploaded['id']}", headers=bearer(key))
    assert (await shown.json()) == uploaded
    app.start_runner()
    by_ref = await _result(app, key, {"model": "echo", "inputs_ref": uploaded["id"]})
    inline = await _result(app, key, {"model": "echo", "inputs": rows})
    assert len(by_ref) == 12
    assert [o["outputs"] for o in by_ref] == [o["outputs"] for o in inline]


async def test_a_json_array_upload_feeds_several_jobs_and_outlives_its_deletion(
    app: JobsApp
) -> None:
    key = add_tenant(app.config, "acme")
    uploaded = await _upload(app, key, orjson.dumps([row(i) for i in range(3)]))
    first = await app.client.post(JOBS, json={"model": "echo", "inputs_ref": uploaded["id"]},
                                  headers=bearer(key))
    assert first.status == 202
    deleted = await app.client.delete(f"{INPUTS}/{uploaded['id']}", headers=bearer(key))
    assert deleted.status == 204
    again = await app.client.post(JOBS, json={"model": "echo", "inputs_ref": uploaded["id"]},
                                  headers=bearer(key))
    assert again.status == 404 and "inputs_ref" in (await again.json())["error"]
    app.start_runner()  # the job made before the deletion copied its rows
    body = await app.finished(first.headers["Location"], key)
    assert body["status"] == "succeeded" and body["progress"]["done"] == 3


async def test_another_tenants_upload_is_404_everywhere(app: JobsApp) -> None:
    owner, other = add_tenant(app.config, "acme"), add_tenant(app.config, "globex")
    uploaded = await _upload(app, owner, orjson.dumps([row(0)]))
    path = f"{INPUTS}/{uploaded['id']}"
    for method in ("GET", "DELETE"):
        assert (await app.client.request(method, path, headers=bearer(other))).status == 404
    job = await app.client.post(JOBS, json={"model": "echo", "inputs_ref": uploaded["id"]},
                                headers=bearer(other))
    assert job.status == 404
    assert "inputs_ref" in (await job.json())["error"]
    assert (await app.client.get(path, headers=bearer(owner))).status == 200


@pytest.mark.parametrize(("body", "headers", "field"), [
    (b"[1]", {}, "inputs[0]:"),
    (orjson.dumps([row(0), {"inputs": []}]), {}, "inputs[1]:"),
    (b"{}", {}, "body: must be a JSON array"),
    (b"[", {}, "body: malformed JSON"),
    (b"", {}, "body: empty"),
    (b"[]", {}, "inputs: no rows"),
    (orjson.dumps(row(0)) + b"\n\nnot json\n", NDJSON, "line 3:"),
    (orjson.dumps([row(0)] * (MAX_ROWS + 1)), {}, f"inputs: {MAX_ROWS + 1} rows, at most"),
])
async def test_bad_uploads_are_400s_naming_the_row(
    app: JobsApp, body: bytes, headers: dict[str, str], field: str
) -> None:
    key = add_tenant(app.config, "acme")
    response = await app.client.post(INPUTS, data=body, headers={
        **bearer(key), "Content-Type": "application/json", **headers})
    assert response.status == 400
    assert field in (await response.json())["error"]


async def test_an_upload_past_the_body_limit_is_a_413(app: JobsApp) -> None:
    key = add_tenant(app.config, "acme")
    body = orjson.dumps([row(0)] * 2000)  # the app takes at most 64 KiB
    response = await app.client.post(INPUTS, data=body, headers=bearer(key))
    assert response.status == 413
    assert "body size" in (await response.json())["error"]
    assert (await app.client.post(INPUTS, data=b"[]")).status == 401


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"model": "echo", "inputs": [row(0)], "inputs_ref": "x"}, 400, "inputs_ref: give either"),
    ({"model": "echo"}, 400, "inputs:"),
    ({"model": "echo", "inputs_ref": 7}, 400, "inputs_ref: must be"),
    ({"model": "echo", "inputs_ref": "no-such-upload"}, 404, "inputs_ref:"),
])
async def test_a_job_names_exactly_one_known_source_of_rows(
    app: JobsApp, body: dict[str, Any], status: int, field: str
) -> None:
    key = add_tenant(app.config, "acme")
    response = await app.client.post(JOBS, json=body, headers=bearer(key))
    assert response.status == status
    assert field in (await response.json())["error"]


async def test_uploaded_rows_meet_the_models_signature_when_a_job_names_them(
    app: JobsApp
) -> None:
    key = add_tenant(app.config, "acme")
    wrong = {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    uploaded = await _upload(app, key, orjson.dumps([row(0), wrong]))
    response = await app.client.post(JOBS, json={"model": "echo", "inputs_ref": uploaded["id"]},
                                     headers=bearer(key))
    assert response.status == 400
    assert "inputs_ref[1]:" in (await response.json())["error"]


async def test_expired_uploads_are_gone_and_swept(app: JobsApp, database_url: str) -> None:
    key = add_tenant(app.config, "acme")
    uploaded = await _upload(app, key, orjson.dumps([row(0)]))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE job_inputs SET expires_at = now() - interval '1 second'")
        path = f"{INPUTS}/{uploaded['id']}"
        assert (await app.client.get(path, headers=bearer(key))).status == 404
        app.start_runner()  # sweeps at start
        await wait_for(lambda: conn.fetchval("SELECT count(*) FROM job_input_rows"),
                       lambda count: count == 0, timeout=30, what="upload swept")
    finally:
        await conn.close()
