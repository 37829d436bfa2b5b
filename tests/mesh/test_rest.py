"""The REST pieces every service shares: the error table, the error middleware, the JSON-object
body reader and request counting, through aiohttp's test client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter

from services.mesh.domain import errors
from services.mesh.transport.rest import (
    STATUS,
    count_requests,
    error_body,
    error_middleware,
    json_response,
    read_body,
    read_json_object,
    status_of,
)

Client = TestClient[web.Request, web.Application]


def _subclasses(cls: type[errors.InfermeshError]) -> list[type[errors.InfermeshError]]:
    found = cls.__subclasses__()
    return found + [sub for child in found for sub in _subclasses(child)]


def test_every_error_class_has_a_status_of_its_own_or_its_parents() -> None:
    """Not the catch-all 500 of the base: a new branch of the tree needs its own row."""
    for cls in _subclasses(errors.InfermeshError):
        nearest = next(base for base in cls.__mro__ if base in STATUS)
        assert nearest is not errors.InfermeshError, cls
    assert all(400 <= status < 600 for status in STATUS.values())


@pytest.mark.parametrize(("error", "status"), [
    (errors.InvalidInput("x"), 400), (errors.Conflict("x"), 409),
    (errors.Unauthenticated("x"), 401), (errors.PermissionDenied("x"), 403),
    (errors.NotFound("x"), 404), (errors.PreconditionFailed("x"), 412),
    (errors.QuotaExceeded("x"), 429), (errors.Overloaded("x"), 503),
    (errors.DeadlineExceeded("x"), 504), (errors.Unavailable("x"), 503),
    (errors.LinkClosed("x"), 503), (errors.InternalError("x"), 500),
])
def test_an_error_takes_the_status_of_its_nearest_class(
    error: errors.InfermeshError, status: int
) -> None:
    assert status_of(error) == status


def _raising(error: BaseException) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        raise error

    return handler


async def _echo(request: web.Request) -> web.Response:
    return json_response(await read_json_object(request))


async def _echo_optional(request: web.Request) -> web.Response:
    return json_response(await read_json_object(request, optional=True))


def _app(**middleware: Any) -> web.Application:
    app = web.Application(middlewares=[error_middleware(**middleware)])
    app.router.add_post("/echo", _echo)
    app.router.add_post("/optional", _echo_optional)
    return app


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with TestClient(TestServer(_app())) as client:
        yield client


@pytest.mark.parametrize(("data", "message"), [
    (b'{"name": ', "body: malformed JSON"),
    (b"", "body: malformed JSON"),
    (b"[1, 2]", "body: must be a JSON object"),
    (b'"text"', "body: must be a JSON object"),
])
async def test_the_reader_refuses_what_is_not_a_json_object_naming_the_body(
    client: Client, data: bytes, message: str
) -> None:
    response = await client.post("/echo", data=data)
    assert response.status == 400
    assert (await response.json())["error"].startswith(message)


async def test_the_reader_returns_the_object_and_an_optional_empty_body_is_empty(
    client: Client,
) -> None:
    response = await client.post("/echo", json={"a": [1, 2]})
    assert (response.status, await response.json()) == (200, {"a": [1, 2]})
    empty = await client.post("/optional", data=b"  ")
    assert (empty.status, await empty.json()) == (200, {})
    assert (await client.post("/echo", data=b"")).status == 400


async def _answer(error: BaseException, **middleware: Any) -> tuple[int, Any, Any]:
    app = _app(**middleware)
    app.router.add_get("/fail", _raising(error))
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/fail")
        return response.status, await response.json(), response.headers


async def test_an_error_is_answered_with_its_status_message_and_headers() -> None:
    error = errors.QuotaExceeded("over quota", retry_after=2.5)
    error.trace_id = "abc123"
    status, body, headers = await _answer(error)
    assert (status, body) == (429, {"error": "over quota", "retry_after": 2.5})
    assert headers["Retry-After"] == "3"  # whole seconds, rounded up
    assert headers["Infermesh-Trace-Id"] == "abc123"
    assert headers["Content-Type"].startswith("application/json")


async def test_a_401_carries_the_services_challenge_only_when_it_has_one() -> None:
    _, _, plain = await _answer(errors.Unauthenticated("who are you"))
    assert "WWW-Authenticate" not in plain
    status, body, headers = await _answer(errors.Unauthenticated("who"), challenge="Bearer")
    assert (status, body, headers["WWW-Authenticate"]) == (401, {"error": "who"}, "Bearer")


async def test_a_body_builder_shapes_the_services_error_object() -> None:
    def with_code(error: errors.InfermeshError) -> dict[str, Any]:
        return {**error_body(error), "code": error.code}

    status, body, _ = await _answer(errors.NotFound("no such model"), body=with_code)
    assert (status, body) == (404, {"error": "no such model", "code": "not_found"})


async def test_aiohttp_errors_and_bugs_are_answered_with_json() -> None:
    status, body, _ = await _answer(web.HTTPRequestEntityTooLarge(10, 20))
    assert (status, body) == (413, {"error": "Request Entity Too Large"})
    status, body, _ = await _answer(web.HTTPRequestEntityTooLarge(10, 20),
                                    http_text=lambda exc: exc.text or exc.reason)
    assert (status, body) == (413, {"error": "Maximum request body size 10 exceeded."})
    status, body, _ = await _answer(KeyError("bug"))
    assert (status, body) == (500, {"error": "internal error"})


async def test_requests_are_counted_by_route_template_and_answered_status() -> None:
    requests = Counter("t_requests", "test", ["method", "route", "status"],
                       registry=(metrics := CollectorRegistry()))
    app = web.Application(middlewares=[count_requests(requests), error_middleware()])
    app.router.add_get("/models/{name}", _raising(errors.NotFound("nope")))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/models/iris")).status == 404
        assert (await client.get("/elsewhere")).status == 404
    labels = {"method": "GET", "status": "404"}
    assert metrics.get_sample_value("t_requests_total", {**labels, "route": "/models/{name}"}) == 1
    assert metrics.get_sample_value("t_requests_total", {**labels, "route": "unmatched"}) == 1


async def _echo_at_most_16(request: web.Request) -> web.Response:
    return web.Response(body=await read_body(request, limit=16))


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    yield body  # no Content-Length: only the bytes read can tell the size


@pytest.mark.parametrize("size", [0, 1, 16])
async def test_a_body_within_the_limit_is_read_whole_with_or_without_a_length(size: int) -> None:
    app = _app()
    app.router.add_post("/at-most-16", _echo_at_most_16)
    body = bytes(range(size))
    async with TestClient(TestServer(app)) as client:
        for data in (body, _chunked(body)):
            response = await client.post("/at-most-16", data=data)
            assert (response.status, await response.read()) == (200, body)


async def test_a_body_past_the_limit_is_413_with_or_without_a_length() -> None:
    app = _app()
    app.router.add_post("/at-most-16", _echo_at_most_16)
    async with TestClient(TestServer(app)) as client:
        for data in (bytes(17), _chunked(bytes(17)), _chunked(bytes(4096))):
            response = await client.post("/at-most-16", data=data)
            assert response.status == 413
