"""The control API's REST adapter: the resources' route tables composed into one app.

Each resource lives in its own package with its routes, validation, SQL and OpenAPI part:
rollouts/ (models and rollouts, run by `RolloutStore` in core.py), tenants/ (tenants, API keys,
model limits) and reports/ (model reports). A new resource adds its tables to `RESOURCES` and
its paths to the OpenAPI document. Errors map to statuses in the one table of
services/mesh/transport/rest.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from control.api.auth import auth_middleware
from control.api.core import RolloutStore, StaleEpoch
from control.api.openapi import openapi_document
from control.api.reports.routes import REPORTS
from control.api.reports.routes import ROUTE_TABLES as REPORT_ROUTES
from control.api.reports.store import ReportStore
from control.api.rollouts.routes import ROUTE_TABLES as ROLLOUT_ROUTES
from control.api.rollouts.routes import STORE
from control.api.tenants.routes import ROUTE_TABLES as TENANCY_ROUTES
from control.api.tenants.routes import TENANTS
from control.api.tenants.store import TenantStore
from services.mesh.domain import errors
from services.mesh.transport.rest import (
    add_metrics_route,
    count_requests,
    error_body,
    error_middleware,
    json_response,
)

OPENAPI = web.AppKey("openapi_json", bytes)
RESOURCES = (*ROLLOUT_ROUTES, *TENANCY_ROUTES, *REPORT_ROUTES)


def _error_body(exc: errors.InfermeshError) -> dict[str, Any]:
    """`{"error": message}`; a stale If-Match also names the current epoch."""
    body = error_body(exc)
    if isinstance(exc, StaleEpoch):
        body["epoch"] = exc.current
    return body


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def create_app(
    store: RolloutStore, tokens: Mapping[str, str], *, tenants: TenantStore,
    reports: ReportStore | None = None,
) -> web.Application:
    """The control API around `store`, `tenants` and `reports` (without it, the report route
    answers 503); `tokens` maps admin secrets to names."""
    metrics = CollectorRegistry()
    requests = Counter(
        "infermesh_control_http_requests", "Control API requests",
        ["method", "route", "status"], registry=metrics,
    )
    app = web.Application(middlewares=[
        count_requests(requests),
        error_middleware(body=_error_body, challenge="Bearer"),
        auth_middleware(tokens),
    ])
    app[STORE] = store
    app[TENANTS] = tenants
    if reports is not None:
        app[REPORTS] = reports
    app[OPENAPI] = orjson.dumps(openapi_document())
    add_metrics_route(app, metrics)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/openapi.json", openapi)
    for table in RESOURCES:
        app.router.add_routes(table)
    return app
