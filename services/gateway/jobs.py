"""Async jobs: many inference requests of one model, submitted at once, run in the background.
No HTTP and no SQL in here (routes: jobs_routes.py; Postgres: jobs_store.py; the runner that
executes rows: jobs_runner.py; checking a submission: jobs_submission.py, in a child process
when large: jobs_offload.py; uploaded rows: jobs_inputs.py).

Why this shape:

- **Durable in Postgres, not in memory or a broker.** The gateway already reaches Postgres
  (feedback), a job must survive the process that runs it, and Postgres gives what a job
  queue needs: `FOR UPDATE SKIP LOCKED` to claim, a lease column to take over after a crash,
  and one transaction to write a chunk's outputs with the job's progress.
- **Run by a task inside every gateway.** The gateway owns tenants, quotas and the request
  path; a job's rows go through `Gateway.infer`, packed several to a request where they may
  share one (jobs_packing.py), admitted under the tenant's quotas (a token per row) and sent
  in the batcher's **bulk** lane, so realtime traffic beside a job keeps its latency. Each
  gateway runs one job at a time with a bounded number of requests in flight; more gateway
  replicas take more jobs.
- **Exactly-once outputs.** A row's output is written only while it is still `pending`, by the
  runner holding the job's lease, so it is written once. A runner killed mid-chunk loses only
  the rows it had not written yet; the next runner executes those again (a model call cannot
  be made transactional with Postgres, so a crash may execute at most one chunk twice, never
  store it twice).

A job's rows are OIP inference request objects (`{"inputs": [...]}`), sent inline
(`inputs`) or uploaded before and named (`inputs_ref`, see jobs_inputs.py), stored as sent and
validated against the model's signature at submission, so a bad row is a 400 naming it
before anything is queued.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson

from services.gateway.access import Access
from services.gateway.auth import AuthFailure, HeaderLookup
from services.gateway.core import Gateway
from services.gateway.jobs_inputs import JobInputs
from services.gateway.jobs_offload import Offload
from services.gateway.jobs_submission import (
    encode_inline_rows,
    encode_stored_rows,
    submission_fields,
)
from services.mesh.domain.errors import Conflict, InfermeshError, InvalidInput, NotFound
from services.mesh.domain.tenancy import Tenant
from services.mesh.domain.types import ModelVersion
from services.webhooks.endpoints import DisabledEndpoints

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated submission, ready to store."""

    id: str
    tenant: str
    model: str
    version: str | None
    rows: list[bytes]
    """Each row's OIP request object as JSON."""
    webhook_url: str | None = None
    webhook_secret: str | None = None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as its owner sees it."""

    id: str
    tenant: str
    model: str
    version: str | None
    status: str
    rows_total: int
    rows_done: int
    rows_failed: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "model": self.model, "version": self.version,
            "status": self.status,
            "progress": {"done": self.rows_done, "failed": self.rows_failed,
                         "total": self.rows_total},
            "created_at": _iso(self.created_at), "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at), "expires_at": _iso(self.expires_at),
            "error": self.error,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job a runner holds the lease of."""

    id: str
    tenant: str
    model: str
    version: str | None


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What running one row gave: its OIP response object (`done`) or `{"error": ...}`
    (`failed`), as JSON."""

    idx: int
    status: str
    output: bytes


class JobStore(Protocol):
    """Where jobs live (Postgres; see jobs_store.py). Every method raises Unavailable when
    the store cannot answer now. Methods taking `runner` act only while it holds the lease."""

    async def create(self, job: NewJob) -> JobRecord: ...

    async def get(self, tenant: str, job_id: str) -> JobRecord | None: ...

    async def outputs(self, tenant: str, job_id: str) -> list[bytes]:
        """Every row's output in row order (a finished job's)."""
        ...

    async def cancel(self, tenant: str, job_id: str, *, retention_s: float) -> JobRecord | None:
        """Cancel the job unless finished; the job as it is after (None: no such job)."""
        ...

    async def claim(self, runner: str, *, lease_s: float) -> ClaimedJob | None: ...

    async def renew(self, job_id: str, runner: str, *, lease_s: float) -> bool:
        """Extend the lease; False when lost (taken over, cancelled, deleted)."""
        ...

    async def pending(self, job_id: str, *, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` rows still pending with an index above `after`, in order."""
        ...

    async def complete(
        self, job_id: str, runner: str, outcomes: list[RowOutcome], *, lease_s: float
    ) -> bool:
        """Write the outcomes of rows still pending and the job's progress in one transaction;
        False when the lease is lost (nothing written)."""
        ...

    async def finish(
        self, job_id: str, runner: str, *, error: str | None, retention_s: float
    ) -> bool:
        """Mark the job succeeded (no row pending) or failed (`error`); False if not ours."""
        ...

    async def sweep(self) -> int:
        """Delete the jobs past their expiry; how many."""
        ...

    async def queued(self) -> int:
        """How many jobs wait for a runner, all tenants (the queue-depth gauge)."""
        ...


def new_job_id() -> str:
    return uuid.uuid4().hex


def error_output(error: InfermeshError) -> bytes:
    """The output stored for a row that failed."""
    return orjson.dumps({"error": error.message, "code": error.code})


class WebhookTargets(Protocol):
    """Checks a webhook URL against a tenant's allowlist (services.webhooks.targets)."""

    async def __call__(self, url: str, allowlist: Sequence[str]) -> object:
        """Return if `url` may be called; InvalidInput naming the field otherwise."""
        ...


class JobService:
    """Submits, shows, cancels and returns the results of a tenant's jobs."""

    def __init__(
        self, core: Gateway, access: Access, store: JobStore, *, max_rows: int = 100_000,
        retention_s: float = 7 * 86400.0, webhook_targets: WebhookTargets | None = None,
        new_secret: Callable[[], str] | None = None,
        on_submitted: Callable[[], None] | None = None, inputs: JobInputs | None = None,
        webhook_endpoints: DisabledEndpoints | None = None, offload: Offload | None = None,
    ) -> None:
        """`offload` parses and checks large submissions off the event loop (None: every
        submission inline)."""
        self._core = core
        self._access = access
        self._store = store
        self._max_rows = max_rows
        self._retention_s = retention_s
        self._webhook_targets = webhook_targets
        self._new_secret = new_secret
        self._on_submitted = on_submitted
        self._offload = offload if offload is not None else Offload(max_inline_bytes=None)
        self.inputs = inputs
        """Uploaded job inputs (`/v1/job-inputs`); None: only inline inputs here."""
        self.webhook_endpoints = webhook_endpoints
        """The tenant's webhook URLs disabled by a 410 (`/v1/webhooks/disabled`)."""

    def authenticate(self, header: HeaderLookup) -> Tenant:
        """The caller's tenant; Unauthenticated or PermissionDenied."""
        outcome = self._access.authenticate(header)
        if isinstance(outcome, AuthFailure):
            self._core.metrics.auth_failures.labels(outcome.reason).inc()
            raise outcome.error()
        return outcome

    async def submit(self, raw: bytes, *, header: HeaderLookup) -> tuple[JobRecord, str | None]:
        """Validate a `POST /v1/jobs` body and store the job as the caller's; the job queued
        and its webhook secret (None without a webhook), which is shown this once."""
        body = await self._offload.run(submission_fields, raw, size=len(raw))
        model, version = body["model"], body.get("version")
        tenant = self._core.authorize(model, header)
        spec = self._core.model_metadata(model, version, header=header)
        rows = await self._rows(tenant, raw, body, spec)
        url, secret = await self._webhook(tenant, body.get("webhook"))
        job = NewJob(new_job_id(), tenant.name, model, version, rows,
                     webhook_url=url, webhook_secret=secret)
        record = await self._store.create(job)
        self._core.metrics.jobs_created.labels(tenant.name).inc()
        if self._on_submitted is not None:
            self._on_submitted()
        return record, secret

    async def _rows(
        self, tenant: Tenant, raw: bytes, body: dict[str, Any], spec: ModelVersion
    ) -> list[bytes]:
        """The job's rows: inline in `raw`, or copied from the tenant's upload named by
        `inputs_ref`; checked off the event loop when large."""
        if "inputs_ref" not in body:
            return await self._offload.run(encode_inline_rows, raw, spec, self._max_rows,
                                           size=len(raw))
        if self.inputs is None:
            raise InvalidInput("inputs_ref: uploaded job inputs are not available here")
        stored = await self.inputs.rows(tenant.name, body["inputs_ref"])
        return await self._offload.run(encode_stored_rows, stored, spec, self._max_rows,
                                       size=sum(map(len, stored)))

    async def _webhook(self, tenant: Tenant, webhook: Any) -> tuple[str | None, str | None]:
        """The job's webhook URL, checked against the tenant's allowlist, and a new secret."""
        if webhook is None:
            return None, None
        if self._webhook_targets is None or self._new_secret is None:
            raise InvalidInput("webhook: webhooks are not available on this gateway")
        url = str(webhook["url"])
        allowlist: Sequence[str] = getattr(tenant, "webhook_allowlist", None) or ()
        await self._webhook_targets(url, allowlist)
        if self.webhook_endpoints is not None and (
            reason := await self.webhook_endpoints.reason(tenant.name, url)
        ):
            raise InvalidInput(f"webhook.url: disabled for this tenant ({reason}); re-enable "
                               "it with DELETE /v1/webhooks/disabled?url=...")
        return url, self._new_secret()

    async def status(self, tenant: Tenant, job_id: str) -> JobRecord:
        """The tenant's job; NotFound for any other (another tenant's included)."""
        record = await self._store.get(tenant.name, job_id)
        if record is None:
            raise NotFound(f"job '{job_id[:64]}' not found")
        return record

    async def result(self, tenant: Tenant, job_id: str) -> tuple[JobRecord, list[bytes]]:
        """A succeeded job's row outputs in order; NotFound before it succeeded."""
        record = await self.status(tenant, job_id)
        if record.status != "succeeded":
            raise NotFound(f"job '{job_id}' has no result: it is {record.status}")
        return record, await self._store.outputs(tenant.name, job_id)

    async def cancel(self, tenant: Tenant, job_id: str) -> JobRecord:
        """Cancel the tenant's job: rows not run yet never will be. Conflict if finished."""
        record = await self._store.cancel(tenant.name, job_id, retention_s=self._retention_s)
        if record is None:
            raise NotFound(f"job '{job_id[:64]}' not found")
        if record.status != "cancelled":
            raise Conflict(f"job '{job_id}' is {record.status} already")
        return record
