"""Checking a `POST /v1/jobs` body: its fields, and each row against the model's signature
(jobs.py says why rows are checked at submission: a bad row is a 400 naming it before anything
is queued). `submission_fields`, `encode_inline_rows` and `encode_stored_rows` take and return
only picklable values: jobs_offload.py runs them in a child process for a large body."""

from __future__ import annotations

from typing import Any

import orjson

from services.gateway.jobs_rows import encode_row
from services.gateway.rest import decode_infer
from services.gateway.validation import validate_request
from services.mesh.domain.errors import InfermeshError, InvalidInput
from services.mesh.domain.types import ModelVersion

FIELDS = ("model", "version", "inputs", "inputs_ref", "webhook")
MAX_NAME = 256


def parse_submission(raw: bytes) -> dict[str, Any]:
    """The JSON object of a `POST /v1/jobs` body, its fields checked but not its rows."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: malformed JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown field (allowed: {', '.join(FIELDS)})")
    _name(body.get("model"), "model", required=True)
    _name(body.get("version"), "version", required=False)
    if "inputs" in body and "inputs_ref" in body:
        raise InvalidInput("inputs_ref: give either inputs or inputs_ref, not both")
    webhook = body.get("webhook")
    if webhook is not None and (
        not isinstance(webhook, dict) or set(webhook) != {"url"}
        or not isinstance(webhook["url"], str) or not webhook["url"]
    ):
        raise InvalidInput('webhook: must be an object {"url": "https://..."}')
    return body


def submission_fields(raw: bytes) -> dict[str, Any]:
    """`parse_submission` of the body without its `inputs`, which stay where they were parsed
    (`encode_inline_rows` parses them again once the model's version is known)."""
    body = parse_submission(raw)
    body.pop("inputs", None)
    return body


def encode_inline_rows(raw: bytes, spec: ModelVersion, max_rows: int) -> list[bytes]:
    """`encode_rows` of the `inputs` of a body `submission_fields` accepted."""
    return encode_rows(orjson.loads(raw).get("inputs"), spec, max_rows=max_rows)


def encode_stored_rows(stored: list[bytes], spec: ModelVersion, max_rows: int) -> list[bytes]:
    """`encode_rows` of an upload's stored rows (JSON each), named `inputs_ref[N]`."""
    rows = [orjson.loads(row) for row in stored]
    return encode_rows(rows, spec, max_rows=max_rows, field="inputs_ref")


def _name(value: Any, field: str, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME:
        raise InvalidInput(f"{field}: must be a string of 1 to {MAX_NAME} characters")


def encode_rows(
    inputs: Any, spec: ModelVersion, *, max_rows: int, field: str = "inputs"
) -> list[bytes]:
    """Each row of `inputs` in its stored form (jobs_rows.py), after checking it decodes into
    a request that fits the signature; InvalidInput names the row (`inputs[3]: ...`, or
    `inputs_ref[3]` as `field`)."""
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f"{field}: must be a non-empty list of inference request objects "
                           "(or give inputs_ref, the id of rows uploaded to /v1/job-inputs)")
    if len(inputs) > max_rows:
        raise InvalidInput(f"{field}: {len(inputs)} rows, at most {max_rows} per job")
    rows = []
    for idx, row in enumerate(inputs):
        if not isinstance(row, dict):
            raise InvalidInput(f"{field}[{idx}]: must be an object like {{\"inputs\": [...]}}")
        try:
            request = decode_infer(row, model=spec.model, version=spec.version,
                                   request_id="", spec=spec)
            validate_request(request, spec.signature, max_rows=spec.batching.max_batch_size)
        except InfermeshError as exc:
            raise InvalidInput(f"{field}[{idx}]: {exc.message}") from None
        rows.append(encode_row(request))
    return rows
