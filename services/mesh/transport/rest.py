"""What every service's aiohttp adapter shares: `/metrics` (one Prometheus registry per service
instance)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


def add_metrics_route(app: web.Application, registry: CollectorRegistry) -> None:
    """Serve `registry` at GET /metrics."""
    app[REGISTRY] = registry
    app.router.add_get("/metrics", _metrics)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
