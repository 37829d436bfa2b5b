"""The registry's REST adapter: decode, one core call, encode. Errors map in the one table of
services/mesh/transport/rest.py."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from services.mesh.domain import errors
from services.mesh.transport.auth import Credential, credential_middleware
from services.mesh.transport.rest import (
    add_metrics_route,
    count_requests,
    error_middleware,
    json_response,
    read_json_object,
)
from services.registry.artifacts import ArtifactTooLarge
from services.registry.core import Registry

REGISTRY = web.AppKey("registry", Registry)
UPLOAD_CHUNK = 256 * 1024


def _required(body: dict[str, Any], field: str) -> Any:
    if field not in body:
        raise errors.InvalidInput(f"missing field '{field}'")
    return body[field]


async def create_model(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    stored = await request.app[REGISTRY].create_model(
        _required(body, "name"), body.get("description", "")
    )
    return json_response(stored.value.to_json(), 201 if stored.created else 200)


async def list_models(request: web.Request) -> web.Response:
    models = await request.app[REGISTRY].list_models()
    return json_response({"models": [m.to_json() for m in models]})


async def get_model(request: web.Request) -> web.Response:
    detail = await request.app[REGISTRY].get_model(request.match_info["name"])
    return json_response(detail.to_json())


async def put_artifact(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    try:
        info = await registry.put_artifact(
            request.content.iter_chunked(UPLOAD_CHUNK),
            expected_sha256=request.headers.get("X-Infermesh-Sha256"),
        )
    except ArtifactTooLarge as exc:  # 413 (and the connection closed: the rest goes unread)
        raise web.HTTPRequestEntityTooLarge(exc.limit, request.content_length or 0,
                                            text=exc.message) from None
    uri = registry.artifact_uri(info.sha256)
    return json_response({"sha256": info.sha256, "size": info.size, "uri": uri}, 201)


async def get_artifact(request: web.Request) -> web.FileResponse:
    sha256 = request.match_info["sha256"]
    path = await request.app[REGISTRY].artifact_path(sha256)
    headers = {"Content-Type": "application/octet-stream", "X-Infermesh-Sha256": sha256}
    return web.FileResponse(path, headers=headers)


async def register_version(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    stored = await request.app[REGISTRY].register_version(
        request.match_info["name"], request.match_info["version"],
        artifact_sha256=_required(body, "artifact_sha256"),
        signature=body.get("signature"),  # an ONNX artifact declares its own
        batching=body.get("batching"),
        device=body.get("device", "auto"),
        cpu_fallback=body.get("cpu_fallback", False),
        platform=body.get("platform", "pytorch_torchscript"),
        prediction_log=body.get("prediction_log", "digest"),
        autoscaling=body.get("autoscaling"),
        cache=body.get("cache"),
        worker=body.get("worker", "shared"),
    )
    return json_response(stored.value.to_json(), 201 if stored.created else 200)


async def change_batching(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    record = await request.app[REGISTRY].change_batching(
        request.match_info["name"], request.match_info["version"], body
    )
    return json_response(record.to_json())


async def change_autoscaling(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    record = await request.app[REGISTRY].change_autoscaling(
        request.match_info["name"], request.match_info["version"], body
    )
    return json_response(record.to_json())


async def change_cache(request: web.Request) -> web.Response:
    """PUT sets the version's prediction cache policy (the body); DELETE turns it off."""
    body = None if request.method == "DELETE" else await read_json_object(request)
    record = await request.app[REGISTRY].change_cache(
        request.match_info["name"], request.match_info["version"], body
    )
    return json_response(record.to_json())


async def quantize_version(request: web.Request) -> web.Response:
    body = await read_json_object(request, optional=True)
    new_version = body.get("version")
    if new_version is not None and not isinstance(new_version, str):
        raise errors.InvalidInput("version: must be a string naming the new version")
    stored = await request.app[REGISTRY].quantize_version(
        request.match_info["name"], request.match_info["version"],
        mode=body.get("mode", "int8-dynamic"), new_version=new_version,
    )
    return json_response(stored.value.to_json(), 201 if stored.created else 200)


def _http_text(exc: web.HTTPException) -> str:
    """aiohttp's own wording of an HTTP error; a 413 names the limit."""
    return exc.text if exc.status == 413 and exc.text else exc.reason


async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


def create_app(registry: Registry, *, credential: Credential) -> web.Application:
    """The registry's HTTP API around `registry`, for callers presenting `credential`
    (all but /healthz and /metrics)."""
    metrics = CollectorRegistry()
    requests = Counter(
        "infermesh_registry_http_requests", "Registry API requests",
        ["method", "route", "status"], registry=metrics,
    )
    app = web.Application(
        middlewares=[count_requests(requests), error_middleware(http_text=_http_text)],
        client_max_size=8 * 1024 * 1024,
    )
    # After the error middleware, which answers its refusal: 401 naming the header.
    app.middlewares.append(credential_middleware(
        credential, open_paths=("/healthz", "/metrics", "/v2/health/live")
    ))
    app[REGISTRY] = registry
    add_metrics_route(app, metrics)
    app.router.add_get("/v2/health/live", live)
    app.router.add_post("/v1/models", create_model)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name}", get_model)
    app.router.add_put("/v1/models/{name}/versions/{version}", register_version)
    app.router.add_patch("/v1/models/{name}/versions/{version}/batching", change_batching)
    app.router.add_patch("/v1/models/{name}/versions/{version}/autoscaling",
                         change_autoscaling)
    app.router.add_post("/v1/models/{name}/versions/{version}/quantize", quantize_version)
    app.router.add_put("/v1/models/{name}/versions/{version}/cache", change_cache)
    app.router.add_delete("/v1/models/{name}/versions/{version}/cache", change_cache)
    app.router.add_put("/v1/artifacts", put_artifact)
    app.router.add_get("/v1/artifacts/{sha256}", get_artifact)
    return app
