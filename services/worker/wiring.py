"""Building a worker from its settings: `python -m services.worker` and fused mode both call
`build_worker`; the batcher reaches it over a link, or calls the core in-process."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.mesh.domain.catalog import ModelCatalog
from services.worker.app import create_app
from services.worker.artifacts import ArtifactCache
from services.worker.core import Worker
from services.worker.factory import backend_factory
from services.worker.metrics import WorkerMetrics
from services.worker.settings import WorkerSettings


@dataclass(frozen=True, slots=True)
class WorkerService:
    """A built, started worker: its core, and the app that serves it to batchers over links."""

    core: Worker
    metrics: WorkerMetrics
    settings: WorkerSettings

    def link_app(self) -> web.Application:
        """Serve the core over links (`/link`, `/metrics`, `/healthz`); not in fused mode."""
        return create_app(self.core, self.metrics, drain_timeout=self.settings.drain_timeout)


async def build_worker(
    settings: WorkerSettings, stack: contextlib.AsyncExitStack, *, catalog: ModelCatalog,
    session: aiohttp.ClientSession, publish_models: Callable[[list[str]], None],
    registry: CollectorRegistry | None = None,
) -> WorkerService:
    """The worker per `settings`, downloading artifacts with `session`, its metrics in
    `registry` (its own when None); started, and closed through `stack`.

    `publish_models(ready)` is called with the ready `model/version`s whenever they change,
    from the first load on (to update this worker's endpoint record).
    """
    metrics = WorkerMetrics(registry)
    core = Worker(
        catalog, models=settings.models,
        artifacts=ArtifactCache(session, Path(settings.cache_dir)),
        backend_factory=backend_factory(settings.threads), metrics=metrics,
    )
    core.subscribe(lambda: publish_models(core.ready_versions()))
    core.start()
    stack.push_async_callback(core.aclose)
    return WorkerService(core, metrics, settings)
