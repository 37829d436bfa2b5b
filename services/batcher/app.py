"""The batcher's aiohttp adapter: a link endpoint for routers, plus /metrics and /healthz."""

from __future__ import annotations

from aiohttp import web

from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.mesh.transport.auth import Credential
from services.mesh.transport.linked import infer_handler
from services.mesh.transport.links import DEFAULT_MAX_FRAME_BYTES, LinkServer, create_link_app

CORE = web.AppKey("batcher", Batcher)


def create_app(
    core: Batcher, metrics: BatcherMetrics, *, credential: Credential,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, drain_timeout: float = 10.0,
) -> web.Application:
    """Serve `core` to routers (presenting `credential`) over links."""
    server = LinkServer(infer_handler(core), name="batcher", credential=credential,
                        max_frame_bytes=max_frame_bytes)
    app = create_link_app(server, metrics.registry, drain_timeout=drain_timeout)
    app[CORE] = core
    return app
