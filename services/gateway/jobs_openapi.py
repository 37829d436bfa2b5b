"""The OpenAPI paths and schemas of async jobs (jobs_routes.py) and of the tenant's disabled
webhook URLs (webhook_routes.py), merged into the gateway's document by openapi.py. Its own
module so that openapi.py stays readable; the helpers are repeated, not imported, so the two
modules do not import each other."""

from __future__ import annotations

from typing import Any

JSON = "application/json"
_MEANING = {
    400: "Invalid input; the message names the field",
    401: "Missing, malformed or unknown API key",
    403: "The tenant is disabled, or may not use this model",
    404: "Unknown job, upload, model or disabled URL (or another tenant's)",
    409: "The job finished already",
    413: "The body is larger than the gateway takes",
    503: "The database, or the process parsing a large body, cannot answer now "
         "(see Retry-After)",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _json(_MEANING[c], _ref("Error")) for c in codes}


def _id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 256}}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


_JOB_ID, _INPUT_ID = _id("job_id"), _id("input_id")
_POLL = {"Retry-After": _header("Seconds to wait before polling the job again")}

PATHS: dict[str, Any] = {
    "/v1/jobs": {"post": {
        "summary": "Submit an async job: one model, many rows, inline or uploaded before",
        "description": "Exactly one of `inputs` (the rows) and `inputs_ref` (the id of rows "
                       "uploaded to /v1/job-inputs). Rows run in the bulk lane under the "
                       "tenant's quotas. With `webhook`, the job's end is POSTed there, "
                       "signed per Standard Webhooks; the secret is shown in this answer only.",
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("JobSubmission")}}},
        "responses": {"202": _json("Queued", _ref("Job"), headers={
                          "Location": _header("/v1/jobs/{id}"), **_POLL}),
                      **_errors(400, 401, 403, 404, 413, 503)},
    }},
    "/v1/jobs/{job_id}": {
        "get": {
            "summary": "A job's status and progress; 303 to its result once it succeeded",
            "parameters": [_JOB_ID],
            "responses": {"200": _json("Queued, running, failed or cancelled", _ref("Job")),
                          "303": _json("Succeeded: the result is at Location", _ref("Job")),
                          **_errors(401, 403, 404, 503)},
        },
        "delete": {
            "summary": "Cancel a job: rows not run yet never run",
            "parameters": [_JOB_ID],
            "responses": {"200": _json("Cancelled", _ref("Job")),
                          **_errors(401, 403, 404, 409, 503)},
        },
    },
    "/v1/jobs/{job_id}/result": {"get": {
        "summary": "A succeeded job's row responses, in row order",
        "parameters": [_JOB_ID],
        "responses": {"200": _json("The result", _ref("JobResult")),
                      **_errors(401, 403, 404, 503)},
    }},
    "/v1/job-inputs": {"post": {
        "summary": "Upload rows for jobs to name by `inputs_ref`",
        "description": "A JSON array of inference request objects, or NDJSON (one a line) "
                       "with Content-Type application/x-ndjson. Kept as long as finished "
                       "jobs are; a job copies the rows it names.",
        "requestBody": {"required": True, "content": {JSON: {"schema": {
            "type": "array", "minItems": 1, "items": _ref("InferenceRequest")}}}},
        "responses": {"201": _json("Stored", _ref("JobInputs"), headers={
                          "Location": _header("/v1/job-inputs/{id}")}),
                      **_errors(400, 401, 403, 413, 503)},
    }},
    "/v1/job-inputs/{input_id}": {
        "get": {"summary": "An upload's row count, size, sha256 and expiry",
                "parameters": [_INPUT_ID],
                "responses": {"200": _json("The upload", _ref("JobInputs")),
                              **_errors(401, 403, 404, 503)}},
        "delete": {"summary": "Delete an upload (jobs made from it keep their rows)",
                   "parameters": [_INPUT_ID],
                   "responses": {"204": {"description": "Deleted"},
                                 **_errors(401, 403, 404, 503)}},
    },
    "/v1/webhooks/disabled": {
        "get": {"summary": "The tenant's webhook URLs disabled by a 410 Gone",
                "responses": {"200": _json("Disabled URLs", _ref("DisabledWebhooks")),
                              **_errors(401, 403, 503)}},
        "delete": {"summary": "Re-enable a disabled webhook URL: deliveries resume from now",
                   "parameters": [{"name": "url", "in": "query", "required": True,
                                   "schema": {"type": "string", "minLength": 1}}],
                   "responses": {"204": {"description": "Re-enabled"},
                                 **_errors(400, 401, 403, 404, 503)}},
    },
}

_WHEN = {"type": ["string", "null"], "format": "date-time"}
SCHEMAS: dict[str, Any] = {
    "JobSubmission": {"type": "object", "required": ["model"], "additionalProperties": False,
                      "properties": {
                          "model": {"type": "string", "minLength": 1, "maxLength": 256},
                          "version": {"type": "string", "minLength": 1, "maxLength": 256},
                          "inputs": {"type": "array", "minItems": 1,
                                     "items": _ref("InferenceRequest")},
                          "inputs_ref": {"type": "string", "minLength": 1, "maxLength": 256},
                          "webhook": {"type": "object", "required": ["url"],
                                      "additionalProperties": False,
                                      "properties": {"url": {"type": "string",
                                                             "format": "uri"}}}}},
    "Job": {"type": "object", "required": ["id", "model", "status", "progress"], "properties": {
        "id": {"type": "string"}, "model": {"type": "string"},
        "version": {"type": ["string", "null"]},
        "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
        "progress": {"type": "object", "required": ["done", "failed", "total"], "properties": {
            "done": {"type": "integer"}, "failed": {"type": "integer"},
            "total": {"type": "integer"}}},
        "created_at": _WHEN, "started_at": _WHEN, "finished_at": _WHEN, "expires_at": _WHEN,
        "error": {"type": ["string", "null"]},
        "webhook_secret": {"type": "string", "description": "whsec_...; in the 202 only"},
    }},
    "JobResult": {"type": "object", "required": ["id", "model", "outputs"], "properties": {
        "id": {"type": "string"}, "model": {"type": "string"},
        "outputs": {"type": "array", "description": "Per row: its inference response, or "
                                                    "{error, code} when the row failed",
                    "items": {"type": "object"}}}},
    "JobInputs": {"type": "object", "required": ["id", "rows", "bytes", "sha256"],
                  "properties": {"id": {"type": "string"}, "rows": {"type": "integer"},
                                 "bytes": {"type": "integer"},
                                 "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                 "created_at": _WHEN, "expires_at": _WHEN}},
    "DisabledWebhooks": {"type": "object", "required": ["disabled"], "properties": {
        "disabled": {"type": "array", "items": {
            "type": "object", "required": ["url", "disabled_at", "reason"],
            "properties": {"url": {"type": "string"}, "disabled_at": _WHEN,
                           "reason": {"type": "string"}}}}}},
}
