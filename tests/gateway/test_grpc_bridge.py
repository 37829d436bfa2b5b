"""Unary gRPC ModelInfer over HTTP/1.1 (the edge's bridge), spoken to as nginx speaks to it:
a POST of the call's length-prefixed message, the status in response headers."""

from __future__ import annotations

import asyncio
import gzip
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tritonclient.grpc import service_pb2 as pb

from services.gateway.app import create_app
from services.gateway.grpc_bridge import PATH, PREFIX, TRAILERS, decode_message, remaining_of
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import InferRequest, InferResponse
from tests.gateway.echo import EchoRouter, echo_gateway

GRPC = {"Content-Type": "application/grpc", "te": "trailers"}


class HoldingRouter(EchoRouter):
    """Echoes, but holds requests whose id is in `held` until their event is set."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[str, asyncio.Event] = {}

    async def infer(self, request: InferRequest) -> InferResponse:
        if request.request_id in self.held:
            await self.held[request.request_id].wait()
        return await super().infer(request)


@pytest.fixture
def router() -> HoldingRouter:
    return HoldingRouter()


@pytest.fixture
async def client(router: HoldingRouter) -> AsyncIterator[TestClient[Any, Any]]:
    client = TestClient(TestServer(create_app(echo_gateway(router))))
    await client.start_server()
    yield client
    await client.close()


def message(model: str = "echo", *, request_id: str = "r1", rows: int = 2) -> bytes:
    array = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    encoded: bytes = pb.ModelInferRequest(
        model_name=model, id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32",
                                                      shape=[rows, 3])],
        raw_input_contents=[array.tobytes()],
    ).SerializeToString()
    return encoded


def framed(payload: bytes, *, compressed: int = 0) -> bytes:
    return PREFIX.pack(compressed, len(payload)) + payload


async def call(client: TestClient[Any, Any], body: bytes, **headers: str) -> Any:
    return await client.post(PATH, data=body, headers={**GRPC, **headers})


async def test_a_call_is_answered_with_its_message_and_status_in_headers(
    client: TestClient[Any, Any], router: HoldingRouter,
) -> None:
    router.parameters = {"bucket": 17}
    answer = await call(client, framed(message()))
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/grpc"
    assert answer.headers["grpc-status"] == "0"
    assert answer.headers["infermesh-model-version"] == "1"
    assert answer.headers["infermesh-bucket"] == "17"
    body = await answer.read()
    compressed, length = PREFIX.unpack_from(body)
    assert (compressed, length) == (0, len(body) - PREFIX.size)
    reply = pb.ModelInferResponse.FromString(body[PREFIX.size:])
    assert (reply.model_name, reply.id, reply.outputs[0].name) == ("echo", "r1", "features_echo")
    sent = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert reply.raw_output_contents[0] == sent.tobytes()
    # Every header that carries trailing metadata is one the edge moves into trailers.
    moved = {name for name in answer.headers if name.lower().startswith(("grpc-", "infermesh"))}
    assert {name.lower() for name in moved} <= set(TRAILERS)


async def test_a_gzip_message_is_read(client: TestClient[Any, Any]) -> None:
    answer = await call(client, framed(gzip.compress(message()), compressed=1),
                        **{"grpc-encoding": "gzip"})
    assert answer.headers["grpc-status"] == "0"


@pytest.mark.parametrize(("body", "headers", "named"), [
    (b"\x00\x00", {}, "body: 2 bytes, shorter"),
    (framed(message())[:-1], {}, "body: the prefix says"),
    (framed(b"\xff\xff\xff"), {}, "body: not a ModelInferRequest"),
    (framed(message(), compressed=1), {"grpc-encoding": "snappy"}, "grpc-encoding header"),
    (framed(b"not gzip", compressed=1), {"grpc-encoding": "gzip"}, "body: not gzip data"),
    (framed(message()), {"grpc-timeout": "soon"}, "grpc-timeout header"),
])
async def test_a_malformed_call_is_invalid_argument_naming_what(
    client: TestClient[Any, Any], body: bytes, headers: dict[str, str], named: str,
) -> None:
    answer = await call(client, body, **headers)
    assert answer.status == 200 and answer.headers["grpc-status"] == "3"  # INVALID_ARGUMENT
    assert named in answer.headers["grpc-message"], answer.headers["grpc-message"]
    assert await answer.read() == b""


async def test_an_unknown_model_is_not_found_and_its_message_percent_encoded(
    client: TestClient[Any, Any],
) -> None:
    answer = await call(client, framed(message("nöpe%")))
    assert answer.headers["grpc-status"] == "5"  # NOT_FOUND
    text = answer.headers["grpc-message"]
    assert "%C3%B6" in text and "%25" in text and text.isascii()


async def test_the_answer_is_deadline_exceeded_at_the_grpc_timeout(
    client: TestClient[Any, Any], router: HoldingRouter,
) -> None:
    router.held["slow"] = asyncio.Event()  # never set: the call can only end by its deadline
    started = time.monotonic()
    answer = await call(client, framed(message(request_id="slow")), **{"grpc-timeout": "200m"})
    assert answer.headers["grpc-status"] == "4"  # DEADLINE_EXCEEDED
    assert time.monotonic() - started >= 0.2


async def test_a_request_that_is_not_grpc_is_refused_with_415(
    client: TestClient[Any, Any],
) -> None:
    answer = await client.post(PATH, data=b"{}", headers={"Content-Type": "application/json"})
    assert answer.status == 415 and "Content-Type header" in await answer.text()


@pytest.mark.parametrize(("value", "seconds"), [
    ("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("250m", 0.25), ("5000u", 0.005),
    ("99999999n", 0.099999999),
])
def test_grpc_timeout_units(value: str, seconds: float) -> None:
    started = time.monotonic()
    remaining = remaining_of(value)
    left, elapsed = remaining(), time.monotonic() - started
    # Dated from the call: what is left is the timeout less at most the time since.
    assert left is not None and seconds - elapsed - 1e-6 <= left <= seconds


def test_no_grpc_timeout_is_no_deadline_and_a_long_one_is_refused() -> None:
    assert remaining_of(None)() is None
    with pytest.raises(InvalidInput, match="grpc-timeout header"):
        remaining_of("123456789S")  # nine digits: the spec allows eight


def test_a_deflate_message_decodes() -> None:
    payload = zlib.compress(message())
    decoded = decode_message(struct.pack(">BI", 1, len(payload)) + payload, "deflate")
    assert decoded.model_name == "echo"


async def test_the_deadline_is_dated_from_the_edges_request_start(
    client: TestClient[Any, Any], router: HoldingRouter,
) -> None:
    """A call that waited 0.4 s at the edge has 0.4 s less of its grpc-timeout; one that
    waited past all of it is DEADLINE_EXCEEDED and never reaches the router."""
    waited = {"grpc-timeout": "10S", "x-request-start": f"t={time.time() - 0.4:.3f}"}
    assert (await call(client, framed(message()), **waited)).headers["grpc-status"] == "0"
    deadline = router.seen[0].deadline
    assert deadline == pytest.approx(time.time() + 10.0 - 0.4, abs=0.3)
    expired = {"grpc-timeout": "1S", "x-request-start": f"t={time.time() - 2:.3f}"}
    answer = await call(client, framed(message(request_id="late")), **expired)
    assert answer.headers["grpc-status"] == "4"  # DEADLINE_EXCEEDED
    assert [request.request_id for request in router.seen] == ["r1"]
