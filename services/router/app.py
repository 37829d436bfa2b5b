"""The router's aiohttp adapter: a link endpoint for gateways, plus /metrics and /healthz."""

from __future__ import annotations

from aiohttp import web

from services.mesh.transport.auth import Credential
from services.mesh.transport.linked import infer_handler
from services.mesh.transport.links import DEFAULT_MAX_FRAME_BYTES, LinkServer, create_link_app
from services.router.core import Router

CORE = web.AppKey("router", Router)


def create_app(
    core: Router, *, credential: Credential, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    drain_timeout: float = 10.0,
) -> web.Application:
    """Serve `core` to gateways (presenting `credential`) over links, and its metrics at
    /metrics."""
    server = LinkServer(infer_handler(core), name="router", credential=credential,
                        max_frame_bytes=max_frame_bytes)
    app = create_link_app(server, core.metrics.registry, drain_timeout=drain_timeout)
    app[CORE] = core
    return app
