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
    bulk_max_wait: float = 1.0
    """Seconds a bulk-lane request waits behind realtime work before it competes as realtime."""
