"""Gateway settings (`INFERMESH_GATEWAY_*`, falling back to `INFERMESH_*`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.gateway.sticky import DEFAULT_STICKY_HEADERS
from services.mesh.infra.settings import ServiceSettings


@dataclass(frozen=True, kw_only=True)
class GatewaySettings(ServiceSettings):
    http_port: int = 8000
    """Port of the OIP v2 REST API."""
    grpc_port: int = 8001
    """Port of the OIP gRPC API (`inference.GRPCInferenceService`)."""
    grpc_compression: str = ""
    """Compression of gRPC responses: "gzip", "deflate" or "" for none (requests are always
    accepted compressed)."""
    max_body_bytes: int = 64 << 20
    """Largest request body accepted; larger gets a 413 naming the limit."""
    default_timeout: float = 30.0
    """Deadline given to a request that names none (parameter `timeout`, seconds)."""
    sticky_headers: tuple[str, ...] = DEFAULT_STICKY_HEADERS
    """Request headers always forwarded to the router as sticky-key candidates (comma
    separated), besides the sticky key of every rollout the gateway knows. List every header a
    rollout may name as `sticky_key`: then users stay on one version even while this gateway's
    copy of a changed rollout lags the router's."""
    auth: bool = True
    """Require an API key (`Authorization: Bearer <key>`) on inference and model endpoints.
    `INFERMESH_GATEWAY_AUTH=0` is dev mode: no keys, every request is tenant `anonymous` with
    no quota (logged loudly at start)."""
    default_model_max_concurrency: int = 0
    """Fleet-wide cap on a model's requests in flight when `limits/{model}` names none;
    0 means no cap."""
    database_url: str = ""
    """Postgres DSN where `POST /v1/feedback` stores feedback (`INFERMESH_GATEWAY_DATABASE_URL`,
    else the shared `INFERMESH_DATABASE_URL`). Empty: feedback answers 503. The gateway
    connects on the first feedback, never at start, and applies no migrations."""
    database_timeout: float = 2.0
    """Seconds a feedback post waits for a Postgres connection, and then for its write, before
    answering 503 with Retry-After."""
    job_retention_s: float = 7 * 86400.0
    """Seconds a finished job (status and results) is kept before the job runner's sweep
    deletes it."""
    job_runner: bool = True
    """Run async jobs (`/v1/jobs`) in this gateway; needs `database_url`. Off: this gateway
    still takes and shows jobs, and other replicas run them."""
    job_concurrency: int = 1
    """Requests of a job in flight at once on this gateway, each of up to `job_pack_rows`
    rows."""
    job_duty: float = 0.5
    """Share of the time each of a job's request slots may be busy while realtime requests
    arrive here (jobs_pacing.py: a slot rests in proportion to its last request); 1: jobs
    never rest. With no realtime request for a second a job runs unpaced."""
    job_pack_rows: int = 32
    """Rows of a job sent as one request where they may share one (same tensors' shapes,
    outputs and parameters; never for a version with features or a cache), at most the
    version's `max_batch_size`; 1: each row its own request."""
    job_lease_s: float = 30.0
    """Seconds a runner's claim on a job lasts unless renewed: how soon another gateway
    takes over the job of one that died."""
    job_max_rows: int = 100_000
    """Most rows (inference requests) in one job; the body is bounded by `max_body_bytes`."""
    job_offload_bytes: int = 256 << 10
    """A `POST /v1/jobs` or `/v1/job-inputs` body (or an `inputs_ref` upload's rows) larger
    than this is parsed and checked in a separate process, started on the first such body, so
    the event loop keeps serving meanwhile; smaller ones on the loop. 0: every body goes there."""
    job_offload_processes: int = 1
    """Processes parsing large job bodies at once (each its own CPU while it works)."""
