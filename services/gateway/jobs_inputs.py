"""Job inputs uploaded once and named by reference: `POST /v1/job-inputs` stores a tenant's
rows, `POST /v1/jobs` with `{"model": ..., "inputs_ref": "<id>"}` runs a job over them.
No HTTP and no SQL in here (routes: jobs_routes.py; Postgres: jobs_inputs_store.py).

Why uploads are model-free: the same rows may feed several models or versions (a shadow
comparison, a re-run after a rollout), so an upload checks only that each row is an OIP request
object; the rows meet a model's signature when a job names them, exactly as inline inputs do
(`jobs_submission.encode_rows`), and the job copies them, so an upload that expires or is
deleted later never changes a job. `sha256` is over the body as sent, for the client to
compare with its own.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson

from services.gateway.jobs_offload import Offload
from services.mesh.domain.errors import InvalidInput, NotFound
from services.mesh.domain.tenancy import Tenant

NDJSON = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
"""Content types read as one request object a line; anything else is a JSON array."""
FIELD = "inputs_ref"


@dataclass(frozen=True, slots=True)
class NewInputs:
    """A parsed upload, ready to store."""

    id: str
    tenant: str
    rows: list[bytes]
    """Each row's OIP request object as JSON."""
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class InputsRecord:
    """An upload as its owner sees it."""

    id: str
    tenant: str
    rows_total: int
    bytes: int
    sha256: str
    created_at: datetime
    expires_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "rows": self.rows_total, "bytes": self.bytes,
                "sha256": self.sha256, "created_at": self.created_at.isoformat(),
                "expires_at": self.expires_at.isoformat()}


class JobInputStore(Protocol):
    """Where uploads live (Postgres; see jobs_inputs_store.py). Every method raises
    Unavailable when the store cannot answer now; a tenant sees only its own uploads."""

    async def put(self, inputs: NewInputs, *, retention_s: float) -> InputsRecord: ...

    async def get(self, tenant: str, input_id: str) -> InputsRecord | None: ...

    async def rows(self, tenant: str, input_id: str) -> list[bytes] | None:
        """Every row in upload order (None: no such upload of this tenant)."""
        ...

    async def delete(self, tenant: str, input_id: str) -> bool: ...


def parse_upload(raw: bytes, content_type: str, *, max_rows: int) -> tuple[list[bytes], str]:
    """The rows of an upload body as JSON, and the body's sha256; InvalidInput naming the row
    (`inputs[3]` of a JSON array, `line 4` of NDJSON). Blocking for large bodies: JobInputs
    runs it in a child process (jobs_offload.py)."""
    digest = hashlib.sha256(raw).hexdigest()
    if content_type.lower() in NDJSON:
        lines = [(f"line {n}", line) for n, line in enumerate(raw.splitlines(), 1)
                 if line.strip()]
        if len(lines) > max_rows:
            raise InvalidInput(f"inputs: {len(lines)} rows, at most {max_rows} per upload")
        return [_row(where, _loads(line, where)) for where, line in lines], digest
    body = _loads(raw, "body")
    if not isinstance(body, list):
        raise InvalidInput("body: must be a JSON array of inference request objects, or "
                           "NDJSON (Content-Type: application/x-ndjson)")
    if len(body) > max_rows:
        raise InvalidInput(f"inputs: {len(body)} rows, at most {max_rows} per upload")
    return [_row(f"inputs[{idx}]", row) for idx, row in enumerate(body)], digest


def _loads(raw: bytes, where: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: malformed JSON ({exc})") from None


def _row(where: str, row: Any) -> bytes:
    inputs = row.get("inputs") if isinstance(row, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f'{where}: must be an object like {{"inputs": [...]}}')
    return orjson.dumps(row)


class JobInputs:
    """Uploads, shows and deletes a tenant's job inputs, and hands their rows to a job."""

    def __init__(
        self, store: JobInputStore, *, max_rows: int = 100_000,
        retention_s: float = 7 * 86400.0, offload: Offload | None = None,
    ) -> None:
        """`offload` parses large uploads off the event loop (None: every upload inline)."""
        self._store = store
        self._max_rows = max_rows
        self._retention_s = retention_s
        self._offload = offload if offload is not None else Offload(max_inline_bytes=None)

    async def upload(self, tenant: Tenant, raw: bytes, *, content_type: str,
                     input_id: str) -> InputsRecord:
        """Store the rows of `raw` as the tenant's, kept for the job retention."""
        if not raw.strip():
            raise InvalidInput("body: empty; send a JSON array or NDJSON of request objects")
        parse = functools.partial(parse_upload, max_rows=self._max_rows)
        rows, digest = await self._offload.run(parse, raw, content_type, size=len(raw))
        if not rows:
            raise InvalidInput("inputs: no rows; send at least one request object")
        new = NewInputs(input_id, tenant.name, rows, len(raw), digest)
        return await self._store.put(new, retention_s=self._retention_s)

    async def show(self, tenant: Tenant, input_id: str) -> InputsRecord:
        record = await self._store.get(tenant.name, input_id)
        if record is None:
            raise NotFound(_unknown(input_id))
        return record

    async def delete(self, tenant: Tenant, input_id: str) -> None:
        """Delete the upload; jobs made from it keep their own copy of the rows."""
        if not await self._store.delete(tenant.name, input_id):
            raise NotFound(_unknown(input_id))

    async def rows(self, tenant: str, input_id: Any) -> list[bytes]:
        """The upload's rows as stored (each a request object as JSON), for a job; NotFound
        naming `inputs_ref`."""
        if not isinstance(input_id, str) or not 1 <= len(input_id) <= 256:
            raise InvalidInput(f"{FIELD}: must be the id of an upload (POST /v1/job-inputs)")
        stored = await self._store.rows(tenant, input_id)
        if stored is None:
            raise NotFound(f"{FIELD}: {_unknown(input_id)}")
        return stored


def _unknown(input_id: str) -> str:
    return f"job inputs '{input_id[:64]}' not found (unknown, expired or deleted)"
