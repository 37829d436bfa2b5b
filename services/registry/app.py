"""The registry's REST adapter: decode, one core call, encode. Errors map in one table."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from services.mesh.domain import errors
from services.mesh.transport.rest import add_metrics_route
from services.registry.core import Registry, VersionConflict

log = logging.getLogger(__name__)

REGISTRY = web.AppKey("registry", Registry)
REQUESTS = web.AppKey("requests_total", Counter)
UPLOAD_CHUNK = 256 * 1024

# Most specific first: the first class the error is an instance of decides the status.
_STATUS: list[tuple[type[errors.InfermeshError], int]] = [
    (VersionConflict, 409),
    (errors.InvalidInput, 400),
    (errors.NotFound, 404),
    (errors.Unauthenticated, 401),
    (errors.PermissionDenied, 403),
    (errors.QuotaExceeded, 429),
    (errors.Overloaded, 503),
    (errors.DeadlineExceeded, 504),
    (errors.Unavailable, 503),
    (errors.InfermeshError, 500),
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn the error tree (and aiohttp's own HTTP errors) into `{"error": message}`."""
    try:
        response = await handler(request)
    except errors.InfermeshError as exc:
        status = next(code for cls, code in _STATUS if isinstance(exc, cls))
        response = _error(status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = _error(500, "internal error")
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    request.app[REQUESTS].labels(request.method, template, str(response.status)).inc()
    return response


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _read_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidInput(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise errors.InvalidInput("the JSON body must be an object")
    return body


def _required(body: dict[str, Any], field: str) -> Any:
    if field not in body:
        raise errors.InvalidInput(f"missing field '{field}'")
    return body[field]


async def create_model(request: web.Request) -> web.Response:
    body = await _read_object(request)
    stored = await request.app[REGISTRY].create_model(
        _required(body, "name"), body.get("description", "")
    )
    return _json(stored.value.to_json(), 201 if stored.created else 200)


async def list_models(request: web.Request) -> web.Response:
    models = await request.app[REGISTRY].list_models()
    return _json({"models": [m.to_json() for m in models]})


async def get_model(request: web.Request) -> web.Response:
    detail = await request.app[REGISTRY].get_model(request.match_info["name"])
    return _json(detail.to_json())


async def put_artifact(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    info = await registry.put_artifact(
        request.content.iter_chunked(UPLOAD_CHUNK),
        expected_sha256=request.headers.get("X-Infermesh-Sha256"),
    )
    uri = registry.artifact_uri(info.sha256)
    return _json({"sha256": info.sha256, "size": info.size, "uri": uri}, 201)


async def get_artifact(request: web.Request) -> web.FileResponse:
    sha256 = request.match_info["sha256"]
    path = await request.app[REGISTRY].artifact_path(sha256)
    headers = {"Content-Type": "application/octet-stream", "X-Infermesh-Sha256": sha256}
    return web.FileResponse(path, headers=headers)


async def register_version(request: web.Request) -> web.Response:
    body = await _read_object(request)
    stored = await request.app[REGISTRY].register_version(
        request.match_info["name"], request.match_info["version"],
        artifact_sha256=_required(body, "artifact_sha256"),
        signature=_required(body, "signature"),
        batching=body.get("batching"),
        device=body.get("device", "auto"),
        platform=body.get("platform", "pytorch_torchscript"),
        prediction_log=body.get("prediction_log", "digest"),
    )
    return _json(stored.value.to_json(), 201 if stored.created else 200)


async def live(request: web.Request) -> web.Response:
    return _json({"live": True})


def create_app(registry: Registry) -> web.Application:
    """The registry's HTTP API around `registry`."""
    app = web.Application(middlewares=[error_middleware], client_max_size=8 * 1024 * 1024)
    app[REGISTRY] = registry
    metrics = CollectorRegistry()
    app[REQUESTS] = Counter(
        "infermesh_registry_http_requests", "Registry API requests",
        ["method", "route", "status"], registry=metrics,
    )
    add_metrics_route(app, metrics)
    app.router.add_get("/v2/health/live", live)
    app.router.add_post("/v1/models", create_model)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name}", get_model)
    app.router.add_put("/v1/models/{name}/versions/{version}", register_version)
    app.router.add_put("/v1/artifacts", put_artifact)
    app.router.add_get("/v1/artifacts/{sha256}", get_artifact)
    return app
