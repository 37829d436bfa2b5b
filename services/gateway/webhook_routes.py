"""`/v1/webhooks/disabled`: a tenant's webhook URLs disabled by a 410 Gone, and re-enabling
one (services/webhooks/endpoints.py says why this is the tenant's to do). Same API keys as
`/v1/jobs`; errors are answered by app.py's error middleware.

    GET    /v1/webhooks/disabled           {"disabled": [{"url", "disabled_at", "reason"}]}
    DELETE /v1/webhooks/disabled?url=...   204: deliveries to it resume from now on;
                                           404 when that URL is not disabled
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from services.gateway.auth import HeaderLookup
from services.mesh.domain.errors import InvalidInput, NotFound
from services.mesh.domain.tenancy import Tenant
from services.mesh.transport.rest import json_response
from services.webhooks.endpoints import DisabledEndpoints

PATH = "/v1/webhooks/disabled"


@dataclass(frozen=True, slots=True)
class _Routes:
    endpoints: DisabledEndpoints
    authenticate: Callable[[HeaderLookup], Tenant]
    """The caller's tenant, or Unauthenticated / PermissionDenied (the job service's)."""


ROUTES = web.AppKey("webhook_routes", _Routes)


async def list_disabled(request: web.Request) -> web.Response:
    routes = request.app[ROUTES]
    tenant = routes.authenticate(request.headers.get)
    found = await routes.endpoints.list(tenant.name)
    return json_response({"disabled": [endpoint.to_json() for endpoint in found]})


async def enable(request: web.Request) -> web.Response:
    routes = request.app[ROUTES]
    tenant = routes.authenticate(request.headers.get)
    url = request.query.get("url", "")
    if not url:
        raise InvalidInput("url: the query parameter naming the webhook URL to re-enable")
    if not await routes.endpoints.enable(tenant.name, url):
        raise NotFound(f"url: {url[:200]!r} is not disabled for this tenant")
    return web.Response(status=204)


def add_webhook_routes(
    app: web.Application, endpoints: DisabledEndpoints, *,
    authenticate: Callable[[HeaderLookup], Tenant],
) -> None:
    """Serve `/v1/webhooks/disabled` over `endpoints`, callers checked by `authenticate`."""
    app[ROUTES] = _Routes(endpoints, authenticate)
    app.router.add_get(PATH, list_disabled)
    app.router.add_delete(PATH, enable)
