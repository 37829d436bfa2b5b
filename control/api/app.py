"""The control API's REST adapter: decode, one core call, encode. Errors map in one table.

Routes live in one `RouteTableDef` per resource (models, rollouts; tenants, keys and limits in
tenant_routes.py; model reports in report_routes.py); a new resource adds its table to
`RESOURCES` and its paths to the OpenAPI document.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter

from control.api.auth import AUTHOR, auth_middleware
from control.api.core import RolloutStore, StaleEpoch
from control.api.openapi import openapi_document
from control.api.report_routes import REPORTS
from control.api.report_routes import ROUTE_TABLES as REPORT_ROUTES
from control.api.reports import ReportStore
from control.api.rest import json_response as _json
from control.api.rest import read_object as _read_object
from control.api.tenant_routes import ROUTE_TABLES as TENANCY_ROUTES
from control.api.tenant_routes import TENANTS
from control.api.tenants import TenantExists, TenantStore
from services.mesh.domain import errors
from services.mesh.transport.rest import add_metrics_route

log = logging.getLogger(__name__)

STORE = web.AppKey("rollout_store", RolloutStore)
REQUESTS = web.AppKey("requests_total", Counter)
OPENAPI = web.AppKey("openapi_json", bytes)
MAX_HISTORY = 1000

# Most specific first: the first class the error is an instance of decides the status.
_STATUS: list[tuple[type[errors.InfermeshError], int]] = [
    (TenantExists, 409),
    (errors.InvalidInput, 400),
    (errors.Unauthenticated, 401),
    (errors.PermissionDenied, 403),
    (errors.NotFound, 404),
    (errors.PreconditionFailed, 412),
    (errors.Unavailable, 503),
    (errors.InfermeshError, 500),
]

_IF_MATCH = re.compile(r'(?:W/)?"(\d+)"|(\d+)')


def _error_response(exc: errors.InfermeshError) -> web.Response:
    status = next(code for cls, code in _STATUS if isinstance(exc, cls))
    body: dict[str, Any] = {"error": exc.message}
    if isinstance(exc, StaleEpoch):
        body["epoch"] = exc.current
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _json(body, status, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn the error tree (and aiohttp's own HTTP errors) into `{"error": message}`."""
    try:
        response = await handler(request)
    except errors.InfermeshError as exc:
        response = _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json({"error": exc.reason}, exc.status)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = _json({"error": "internal error"}, 500)
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    request.app[REQUESTS].labels(request.method, template, str(response.status)).inc()
    return response


def parse_if_match(value: str | None) -> int | None:
    """The epoch an `If-Match` header names: `"5"`, `5` or `W/"5"`; None for absent or `*`."""
    if value is None or value.strip() == "*":
        return None
    match = _IF_MATCH.fullmatch(value.strip())
    if match is None:
        raise errors.InvalidInput(f'If-Match: expected an epoch such as "5" (or *), got {value!r}')
    return int(match.group(1) or match.group(2))


def _limit(raw: str | None) -> int:
    if raw is None:
        return 50
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_HISTORY:
        raise errors.InvalidInput(f"limit: must be an integer in [1, {MAX_HISTORY}], got {raw!r}")
    return int(raw)


def _rollback_args(body: Mapping[str, Any]) -> tuple[int | None, str]:
    unknown = sorted(set(body) - {"epoch", "reason"})
    if unknown:
        raise errors.InvalidInput(f"{unknown[0]}: unknown field (allowed: epoch, reason)")
    epoch, reason = body.get("epoch"), body.get("reason", "")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1):
        raise errors.InvalidInput("epoch: must be a positive integer")
    if not isinstance(reason, str):
        raise errors.InvalidInput("reason: must be a string")
    return epoch, reason


def _with_etag(record: dict[str, Any], epoch: int) -> web.Response:
    return _json(record, headers={"ETag": f'"{epoch}"'})


models = web.RouteTableDef()
rollouts = web.RouteTableDef()


@models.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    found = await request.app[STORE].list_models()
    return _json({"models": [m.to_json() for m in found]})


@models.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    detail = await request.app[STORE].get_model(request.match_info["model"])
    return _json(detail.to_json())


@rollouts.get("/v1/rollouts/{model}")
async def get_rollout(request: web.Request) -> web.Response:
    state = await request.app[STORE].get(request.match_info["model"])
    return _with_etag(state.to_json(), state.rollout.epoch)


@rollouts.put("/v1/rollouts/{model}")
async def put_rollout(request: web.Request) -> web.Response:
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await _read_object(request)
    rollout = await request.app[STORE].apply(
        request.match_info["model"], body, author=request[AUTHOR], if_match=if_match
    )
    return _with_etag(rollout.to_json(), rollout.epoch)


@rollouts.post("/v1/rollouts/{model}/rollback")
async def rollback(request: web.Request) -> web.Response:
    epoch, reason = _rollback_args(await _read_object(request, optional=True))
    rollout = await request.app[STORE].rollback(
        request.match_info["model"], to_epoch=epoch, author=request[AUTHOR], reason=reason
    )
    return _with_etag(rollout.to_json(), rollout.epoch)


@rollouts.get("/v1/rollouts/{model}/history")
async def history(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    limit = _limit(request.query.get("limit"))
    entries = await request.app[STORE].history(model, limit=limit)
    return _json({"model": model, "history": [e.to_json() for e in entries]})


RESOURCES = (models, rollouts, *TENANCY_ROUTES, *REPORT_ROUTES)


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def create_app(
    store: RolloutStore, tokens: Mapping[str, str], *, tenants: TenantStore,
    reports: ReportStore | None = None,
) -> web.Application:
    """The control API around `store`, `tenants` and `reports` (without it, the report route
    answers 503); `tokens` maps admin secrets to names."""
    app = web.Application(middlewares=[error_middleware, auth_middleware(tokens)])
    app[STORE] = store
    app[TENANTS] = tenants
    if reports is not None:
        app[REPORTS] = reports
    app[OPENAPI] = orjson.dumps(openapi_document())
    metrics = CollectorRegistry()
    app[REQUESTS] = Counter(
        "infermesh_control_http_requests", "Control API requests",
        ["method", "route", "status"], registry=metrics,
    )
    add_metrics_route(app, metrics)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/openapi.json", openapi)
    for table in RESOURCES:
        app.router.add_routes(table)
    return app
