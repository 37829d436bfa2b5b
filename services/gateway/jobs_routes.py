"""`/v1/jobs`: the REST adapter of the JobService. Errors are answered by app.py's error
middleware (services/mesh/transport/rest.py holds the one table).

    POST   /v1/jobs               202, Location: /v1/jobs/{id}, Retry-After: 1
    GET    /v1/jobs/{id}          200 with status and progress; 303 to .../result once succeeded
    GET    /v1/jobs/{id}/result   the rows' OIP responses in order (404 before success)
    DELETE /v1/jobs/{id}          cancels: rows not run yet never run

    POST   /v1/job-inputs         201, Location: /v1/job-inputs/{id}: rows uploaded for jobs to
                                  name (`inputs_ref`); a JSON array, or NDJSON by Content-Type
    GET    /v1/job-inputs/{id}    the upload's row count, size, sha256 and expiry
    DELETE /v1/job-inputs/{id}    204; jobs made from it keep their rows
"""

from __future__ import annotations

import orjson
from aiohttp import web

from services.gateway.jobs import JobService, new_job_id
from services.gateway.jobs_inputs import JobInputs
from services.gateway.webhook_routes import add_webhook_routes
from services.mesh.transport.rest import json_response, read_body

JOBS = web.AppKey("jobs", JobService)
PATH = "/v1/jobs"
INPUTS_PATH = "/v1/job-inputs"
RETRY_AFTER = "1"
"""Seconds a client is told to wait before polling a job again."""


def _location(job_id: str) -> str:
    return f"{PATH}/{job_id}"


async def post_job(request: web.Request) -> web.Response:
    service, header = request.app[JOBS], request.headers.get
    service.authenticate(header)  # 401/403 before the body is read
    raw = await read_body(request)
    record, secret = await service.submit(raw, header=header)
    body = record.to_json()
    if secret is not None:
        body["webhook_secret"] = secret  # shown this once
    headers = {"Location": _location(record.id), "Retry-After": RETRY_AFTER}
    return json_response(body, status=202, headers=headers)


async def get_job(request: web.Request) -> web.Response:
    service = request.app[JOBS]
    tenant = service.authenticate(request.headers.get)
    record = await service.status(tenant, request.match_info["job_id"])
    if record.status == "succeeded":
        headers = {"Location": f"{_location(record.id)}/result"}
        return json_response(record.to_json(), status=303, headers=headers)
    headers = {} if record.status in ("failed", "cancelled") else {"Retry-After": RETRY_AFTER}
    return json_response(record.to_json(), headers=headers)


async def get_result(request: web.Request) -> web.Response:
    service = request.app[JOBS]
    tenant = service.authenticate(request.headers.get)
    record, outputs = await service.result(tenant, request.match_info["job_id"])
    # The rows' responses are stored as JSON already: joined, never parsed again.
    head = [b'{"id":', orjson.dumps(record.id), b',"model":', orjson.dumps(record.model)]
    body = b"".join([*head, b',"outputs":[', b",".join(outputs), b"]}"])
    return web.Response(body=body, content_type="application/json")


async def delete_job(request: web.Request) -> web.Response:
    service = request.app[JOBS]
    tenant = service.authenticate(request.headers.get)
    record = await service.cancel(tenant, request.match_info["job_id"])
    return json_response(record.to_json())


def _inputs(request: web.Request) -> JobInputs:
    inputs = request.app[JOBS].inputs
    assert inputs is not None, "routed only with uploads on"
    return inputs


async def post_inputs(request: web.Request) -> web.Response:
    service, header = request.app[JOBS], request.headers.get
    tenant = service.authenticate(header)  # 401/403 before the body is read
    raw = await read_body(request)  # 413 past the gateway's max_body_bytes
    record = await _inputs(request).upload(tenant, raw, content_type=request.content_type,
                                           input_id=new_job_id())
    headers = {"Location": f"{INPUTS_PATH}/{record.id}"}
    return json_response(record.to_json(), status=201, headers=headers)


async def get_inputs(request: web.Request) -> web.Response:
    tenant = request.app[JOBS].authenticate(request.headers.get)
    record = await _inputs(request).show(tenant, request.match_info["input_id"])
    return json_response(record.to_json())


async def delete_inputs(request: web.Request) -> web.Response:
    tenant = request.app[JOBS].authenticate(request.headers.get)
    await _inputs(request).delete(tenant, request.match_info["input_id"])
    return web.Response(status=204)


def add_job_routes(app: web.Application, service: JobService) -> None:
    """Serve `/v1/jobs` through `service`, `/v1/job-inputs` when it takes uploads, and
    `/v1/webhooks/disabled` when it knows the disabled webhook URLs."""
    app[JOBS] = service
    app.router.add_post(PATH, post_job)
    app.router.add_get(PATH + "/{job_id}", get_job)
    app.router.add_get(PATH + "/{job_id}/result", get_result)
    app.router.add_delete(PATH + "/{job_id}", delete_job)
    if service.inputs is not None:
        app.router.add_post(INPUTS_PATH, post_inputs)
        app.router.add_get(INPUTS_PATH + "/{input_id}", get_inputs)
        app.router.add_delete(INPUTS_PATH + "/{input_id}", delete_inputs)
    if service.webhook_endpoints is not None:
        add_webhook_routes(app, service.webhook_endpoints, authenticate=service.authenticate)
