"""What every service's aiohttp adapter shares: the one table from the error tree to HTTP
statuses, the error middleware built on it, JSON bodies in and out, request counting, and
`/metrics` (one Prometheus registry per service instance).

Every service answers an error with a JSON object whose `error` is the message. What else the
object holds is the service's own (the control API adds a stale rollout's current `epoch`), so
the middleware takes a body builder; it also takes the `WWW-Authenticate` challenge a 401
carries, and how an aiohttp HTTP error (404 for an unknown path, 413) is worded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from services.mesh.domain import errors

log = logging.getLogger(__name__)

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
JSON = "application/json"

STATUS: Mapping[type[errors.InfermeshError], int] = {
    errors.InvalidInput: 400,
    errors.Conflict: 409,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.PreconditionFailed: 412,
    errors.QuotaExceeded: 429,
    errors.Overloaded: 503,
    errors.DeadlineExceeded: 504,
    errors.Unavailable: 503,
    errors.ModelFailed: 500,
    errors.InternalError: 500,
    errors.InfermeshError: 500,
}
"""The one table from the error tree to HTTP statuses; a subclass takes its nearest ancestor's."""

ErrorBody = Callable[[errors.InfermeshError], dict[str, Any]]
"""Builds the JSON object a service answers an error with."""


def status_of(error: errors.InfermeshError) -> int:
    """The HTTP status of `error`: that of the nearest of its classes in `STATUS`."""
    return next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)


def error_body(error: errors.InfermeshError) -> dict[str, Any]:
    """`{"error": message}`, with `retry_after` (seconds) when the error has one."""
    body: dict[str, Any] = {"error": error.message}
    if error.retry_after is not None:
        body["retry_after"] = error.retry_after
    return body


def http_reason(error: web.HTTPException) -> str:
    """An aiohttp HTTP error worded by its reason alone ("Not Found")."""
    return error.reason


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`body` as an orjson-encoded `application/json` response."""
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON, headers=headers)


def parse_json_object(raw: bytes | memoryview) -> dict[str, Any]:
    """The JSON object `raw` holds; InvalidInput naming the body when it holds anything else."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # also nesting deeper than orjson's 1024 levels
        raise errors.InvalidInput(f"body: malformed JSON ({exc})") from None
    if not isinstance(body, dict):
        raise errors.InvalidInput("body: must be a JSON object")
    return body


CONTENT_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate", "br"})
"""The Content-Encodings aiohttp undoes for us; anything else would reach us still encoded."""


async def read_body(request: web.Request, *, limit: int | None = None) -> bytes:
    """The request's body, decoded from its Content-Encoding, at most `limit` bytes (decoded)
    and at most the app's `client_max_size`.

    A larger body is refused with 413 as soon as its Content-Length, or the bytes read so
    far, say so: the rest is never read. An encoding aiohttp does not undo, or a body that
    does not decode (corrupt gzip, garbage brotli), is InvalidInput naming the header.
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in CONTENT_ENCODINGS:
        raise errors.InvalidInput(
            f"Content-Encoding header: {encoding[:40]!r} is not supported "
            f"(use identity, gzip, deflate or br)"
        )
    cap = request.client_max_size if limit is None else min(limit, request.client_max_size)
    size = request.content_length
    if size is not None and size > cap:
        raise web.HTTPRequestEntityTooLarge(cap, size)
    try:
        if request.content.is_eof():  # it all came with the headers: no wait, no copy
            whole = request.content.read_nowait()
            if len(whole) > cap:
                raise web.HTTPRequestEntityTooLarge(cap, len(whole))
            return whole
        body = bytearray()
        while chunk := await request.content.readany():
            body.extend(chunk)
            if len(body) > cap:
                raise web.HTTPRequestEntityTooLarge(cap, len(body))
    except web.RequestPayloadError as exc:
        raise errors.InvalidInput(f"body: {payload_problem(exc)}") from None
    return bytes(body)


def payload_problem(exc: web.RequestPayloadError) -> str:
    """What aiohttp found wrong with a request body, in words ("Can not decode
    content-encoding: br")."""
    cause = exc.__cause__
    if isinstance(cause, HttpProcessingError) and cause.message:
        return cause.message
    return str(exc) or "could not be read"


async def read_json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object body; with `optional`, `{}` for an empty body."""
    raw = await read_body(request)
    if optional and not raw.strip():
        return {}
    return parse_json_object(raw)


def error_middleware(
    *, body: ErrorBody = error_body, challenge: str | None = None,
    http_text: Callable[[web.HTTPException], str] = http_reason,
) -> Middleware:
    """Answer the error tree (status from `STATUS`, object from `body`), aiohttp's own HTTP
    errors (`{"error": http_text(exc)}`) and anything unexpected (500, logged) with JSON.

    A 401 carries `WWW-Authenticate: challenge` when one is given; an error with a
    `retry_after` carries `Retry-After` (whole seconds, rounded up), one with a trace
    `Infermesh-Trace-Id`.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.InfermeshError as exc:
            status = status_of(exc)
            response = json_response(body(exc), status, _error_headers(exc, status, challenge))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = json_response({"error": http_text(exc)}, exc.status)
        except web.RequestPayloadError as exc:  # a handler that read the body itself
            response = json_response({"error": f"body: {payload_problem(exc)}"}, 400)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return json_response({"error": "internal error"}, 500)
        return _unread_body_closes(request, response)

    return middleware


def _unread_body_closes(request: web.Request, response: web.Response) -> web.Response:
    """Close the connection after a body that failed to decode, or one refused as too large:
    aiohttp would otherwise read (and fail reading, or discard) the rest to keep the
    connection alive."""
    if request.content.exception() is not None:
        request.content.feed_eof()  # nothing more to read: aiohttp must not try (and log)
        response.force_close()
    elif response.status == 413:
        response.force_close()
    return response


def _error_headers(
    error: errors.InfermeshError, status: int, challenge: str | None
) -> dict[str, str]:
    headers: dict[str, str] = {}
    if error.trace_id is not None:
        headers["Infermesh-Trace-Id"] = error.trace_id
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if status == 401 and challenge is not None:
        headers["WWW-Authenticate"] = challenge
    return headers


def count_requests(counter: Counter) -> Middleware:
    """Count every answered request in `counter` by method, route template and status.

    Placed before `error_middleware`, it counts the status the error was answered with.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        route = request.match_info.route.resource
        template = route.canonical if route is not None else "unmatched"
        counter.labels(request.method, template, str(response.status)).inc()
        return response

    return middleware


def add_metrics_route(app: web.Application, registry: CollectorRegistry) -> None:
    """Serve `registry` at GET /metrics."""
    app[REGISTRY] = registry
    app.router.add_get("/metrics", _metrics)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
