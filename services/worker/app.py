"""The worker's aiohttp adapter: a link endpoint for batchers, plus /metrics and /healthz."""

from __future__ import annotations

from aiohttp import web

from services.mesh.transport.auth import Credential
from services.mesh.transport.linked import batch_handler
from services.mesh.transport.links import DEFAULT_MAX_FRAME_BYTES, LinkServer, create_link_app
from services.worker.core import Worker
from services.worker.metrics import WorkerMetrics

CORE = web.AppKey("worker", Worker)


def create_app(
    core: Worker, metrics: WorkerMetrics, *, credential: Credential,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, drain_timeout: float = 10.0,
) -> web.Application:
    """Serve `core` to batchers (presenting `credential`) over links."""
    server = LinkServer(batch_handler(core), name="worker", credential=credential,
                        max_frame_bytes=max_frame_bytes)
    app = create_link_app(server, metrics.registry, drain_timeout=drain_timeout)
    app[CORE] = core
    return app
