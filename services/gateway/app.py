"""The gateway's REST adapter: Open Inference Protocol v2 over aiohttp. Thin handlers."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

import orjson
from aiohttp import web

from services.gateway import binary, rest
from services.gateway.core import SERVER_NAME, SERVER_VERSION, Gateway
from services.gateway.feature_routes import add_feature_routes
from services.gateway.features import FeatureWriter
from services.gateway.feedback import FeedbackRecorder
from services.gateway.feedback_routes import add_feedback_route
from services.gateway.grpc_bridge import add_bridge_route
from services.gateway.jobs import JobService
from services.gateway.jobs_routes import add_job_routes
from services.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from services.gateway.openapi import add_openapi_route
from services.gateway.validation import max_body_bytes
from services.mesh.domain import errors
from services.mesh.domain.ids import check_request_id
from services.mesh.domain.types import InferResponse
from services.mesh.transport.rest import (
    JSON,
    add_metrics_route,
    error_middleware,
    json_response,
    read_body,
    status_of,
)

CORE = web.AppKey("gateway", Gateway)
REQUEST_ID = "X-Request-Id"

HIDDEN_MODEL_CODES = frozenset({401, 403, 404})
"""Statuses of requests refused before their model was known to be real and theirs to use."""
CLIENT_CLOSED = 499
"""The code (nginx's) counted for a request whose client went away before the answer."""


class track:  # noqa: N801 - used as a function: `with track(metrics, model):`
    """Count one inference request by model and status, and time it (a class, not a
    generator: it runs on every request, and this costs a third of `contextmanager`'s)."""

    __slots__ = ("_metrics", "_model", "_started")

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self._metrics, self._model = metrics, model
        self._started = time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        code = 200 if exc is None else _code_of(exc)
        label = UNKNOWN_MODEL if code in HIDDEN_MODEL_CODES else self._model
        self._metrics.observe(label, str(code), protocol="rest",
                              seconds=time.perf_counter() - self._started)


def _code_of(exc: BaseException) -> int:
    """The status counted for a request that ended in `exc`."""
    if isinstance(exc, errors.InfermeshError):
        return status_of(exc)
    if isinstance(exc, web.HTTPException):
        return exc.status
    return CLIENT_CLOSED if isinstance(exc, asyncio.CancelledError) else 500


def _http_text(exc: web.HTTPException) -> str:
    """aiohttp's own wording of an HTTP error: a 413 names the limit and the size sent."""
    return exc.text or exc.reason


async def server_metadata(request: web.Request) -> web.Response:
    body = {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}
    return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[CORE].live() else 503)


async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[CORE].ready() else 503)


async def model_metadata(request: web.Request) -> web.Response:
    core, model = request.app[CORE], request.match_info["model"]
    spec = core.model_metadata(model, request.match_info.get("version"),
                               header=request.headers.get)
    return json_response(rest.model_metadata(spec, core.model_versions(model)))


async def model_ready(request: web.Request) -> web.Response:
    core = request.app[CORE]
    is_ready = core.model_ready(request.match_info["model"], request.match_info.get("version"),
                                header=request.headers.get)
    return web.Response(status=200 if is_ready else 503)


async def infer(request: web.Request) -> web.Response:
    core, model = request.app[CORE], request.match_info["model"]
    version, header = request.match_info.get("version"), request.headers.get
    # Access (401, 403, 404, 429) is settled before the body is read.
    with track(core.metrics, model), core.admit(model, version, header=header) as admission:
        request_id = _request_id(header(REQUEST_ID), core)
        arrived = core.arrival(rest.request_start(header(rest.REQUEST_START)))
        deadline = core.deadline_after(rest.request_timeout(header(rest.REQUEST_TIMEOUT)),
                                       arrived)
        if deadline is not None:
            try:
                core.refuse_before_reading(model, admission, deadline)
            except errors.InfermeshError as exc:
                core.trace_refusal(exc, model=model, request_id=request_id,
                                   admission=admission, header=header)
                raise
        # Bounded by what a valid request could need (413 past it, the rest never read).
        body = await read_body(request, limit=max_body_bytes(admission.spec))
        try:
            infer_request, output_format = rest.decode_infer_body(
                body, header_length=header(binary.HEADER_LENGTH),
                model=model, version=version, request_id=request_id, spec=admission.spec,
            )
        except errors.InfermeshError as exc:
            core.trace_refusal(exc, model=model, request_id=request_id, admission=admission,
                               header=header)
            raise
        infer_request.deadline = deadline
        response = await core.infer(infer_request, admission=admission, header=header,
                                    arrived=arrived)
        body, header_length = rest.encode_infer_parts(response, output_format)
        core.ensure_on_time(infer_request.deadline)  # encoding a large answer takes time too
        return _infer_response(body, header_length, response,
                               compress="Accept-Encoding" in request.headers)


def _request_id(client_id: str | None, core: Gateway) -> str:
    """The client's X-Request-Id, checked before the body is read, or a new id."""
    if not client_id:
        return core.new_request_id()
    return check_request_id(client_id, field=f"{REQUEST_ID} header")


def _infer_response(
    body: bytes, header_length: int | None, served: InferResponse, *, compress: bool
) -> web.Response:
    headers = {REQUEST_ID: served.request_id}
    rest.add_served_headers(headers, served)
    if header_length is not None:
        headers[binary.HEADER_LENGTH] = str(header_length)
    content_type = JSON if header_length is None else "application/octet-stream"
    response = web.Response(body=body, content_type=content_type, headers=headers)
    if compress:  # gzip or deflate as the client's Accept-Encoding asks
        response.enable_compression()
    return response


def create_app(
    core: Gateway, *, max_body_bytes: int = 64 << 20, feedback: FeedbackRecorder | None = None,
    features: FeatureWriter | None = None, jobs: JobService | None = None,
) -> web.Application:
    """The OIP v2 REST application over a gateway core; /metrics serves the core's registry.

    Inference and model endpoints need an API key (when the core's access asks for one);
    server health, server metadata and /metrics stay open for probes and scrapers. With
    `feedback`, `POST /v1/feedback` takes feedback on predictions (same API keys).
    """
    errors_as_json = error_middleware(challenge='Bearer realm="infermesh"', http_text=_http_text)
    app = web.Application(middlewares=[errors_as_json], client_max_size=max_body_bytes)
    app[CORE] = core
    add_metrics_route(app, core.metrics.registry)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, model_metadata)
        app.router.add_get(f"{base}/ready", model_ready)
        app.router.add_post(f"{base}/infer", infer)
    if feedback is not None:
        add_feedback_route(app, feedback)
    if features is not None:  # PUT /v1/features/..., POST /v1/features/{type}:bulk
        add_feature_routes(app, features)
    if jobs is not None:  # POST /v1/jobs, GET|DELETE /v1/jobs/{id}, GET .../result
        add_job_routes(app, jobs)
    add_bridge_route(app, core)  # unary gRPC ModelInfer from the edge, over HTTP/1.1
    add_openapi_route(app)
    return app
