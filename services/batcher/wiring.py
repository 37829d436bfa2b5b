"""Building a batcher from its settings: `python -m services.batcher` and fused mode both call
`build_batcher`, and differ only in the workers they hand it (a link pool, or the in-process
worker core)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from services.batcher.app import create_app
from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.batcher.settings import BatcherSettings
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.hops import WorkerPool
from services.mesh.transport.auth import Credential


@dataclass(frozen=True, slots=True)
class BatcherService:
    """A built, started batcher: its core, and the app that serves it to routers over links."""

    core: Batcher
    metrics: BatcherMetrics
    settings: BatcherSettings

    def link_app(self, credential: Credential) -> web.Application:
        """Serve the core over links (`/link`, `/metrics`, `/healthz`) to callers presenting
        `credential`; not in fused mode."""
        return create_app(self.core, self.metrics, credential=credential,
                          max_frame_bytes=self.settings.max_frame_bytes,
                          drain_timeout=self.settings.drain_timeout)


async def build_batcher(
    settings: BatcherSettings, stack: contextlib.AsyncExitStack, *, catalog: ModelCatalog,
    workers: WorkerPool, registry: CollectorRegistry | None = None,
) -> BatcherService:
    """The batcher per `settings`, dispatching to `workers`, its metrics in `registry` (its
    own when None); started, and closed through `stack`."""
    metrics = BatcherMetrics(registry)
    core = Batcher(
        catalog, workers, metrics=metrics, pipeline_depth=settings.pipeline_depth,
        no_worker_grace=settings.no_worker_grace, bulk_max_wait=settings.bulk_max_wait,
        cold_start_grace=settings.cold_start_grace,
    )
    core.start()
    stack.push_async_callback(core.aclose)
    return BatcherService(core, metrics, settings)
