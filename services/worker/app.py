"""The worker's aiohttp adapter: a link endpoint for batchers, plus /metrics and /healthz."""

from __future__ import annotations

from aiohttp import web

from services.mesh.transport.linked import batch_handler
from services.mesh.transport.links import LinkServer, create_link_app
from services.worker.core import Worker
from services.worker.metrics import WorkerMetrics

CORE = web.AppKey("worker", Worker)


def create_app(
    core: Worker, metrics: WorkerMetrics, *, drain_timeout: float = 10.0
) -> web.Application:
    """Serve `core` to batchers over links."""
    server = LinkServer(batch_handler(core), name="worker")
    app = create_link_app(server, metrics.registry, drain_timeout=drain_timeout)
    app[CORE] = core
    return app
