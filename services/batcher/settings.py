"""Batcher settings (`INFERMESH_BATCHER_*`, falling back to `INFERMESH_*`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.infra.settings import ServiceSettings


@dataclass(frozen=True, kw_only=True)
class BatcherSettings(ServiceSettings):
    pipeline_depth: int = 2
    """Batches in flight per worker: one running, one waiting so the worker never idles."""
    no_worker_grace: float = 5.0
    """Seconds a request waits for a version with no ready worker before a 503."""
    cold_start_grace: float = 300.0
    """The same for a version that scales (a `scale/` record, or `replicas.min` 0): its worker
    is on its way, so a request waits for it up to its deadline, but at most this long."""
    bulk_max_wait: float = 1.0
    """Seconds a bulk-lane request waits behind realtime work before it competes as realtime."""
