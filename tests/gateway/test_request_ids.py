"""Client-chosen request ids and API keys the gateway cannot echo, log or hash are refused
up front: 400 naming the field for an id (INVALID_ARGUMENT over gRPC), 401 naming the header
for a key. Raw header bytes go over a plain socket, since aiohttp's client sends only UTF-8."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.grpc_app import create_grpc_server
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.ids import MAX_REQUEST_ID, check_request_id
from tests.gateway.echo import EchoRouter, echo_config, echo_gateway
from tests.gateway.tenancy import add_tenant

INFER = "/v2/models/echo/infer"
INPUT = {"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
BAD_IDS = ["abc\r\nX: 1", "a\u0000b", "x" * 10_000, " padded", "caf\u00e9", ""]


@pytest.fixture
def router() -> EchoRouter:
    return EchoRouter()


@pytest.fixture
async def client(router: EchoRouter) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(echo_gateway(router)))) as client:
        yield client


async def raw_post(client: TestClient[Any, Any], headers: bytes) -> tuple[int, Any]:
    """POST an echo inference with `headers` (raw CRLF-ended lines); the status and JSON."""
    body = orjson.dumps({"inputs": [INPUT]})
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n" + headers
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(payload)


@pytest.mark.parametrize("value", [v for v in BAD_IDS if v])
async def test_a_body_id_that_cannot_be_echoed_is_400_before_any_work(
    client: TestClient[Any, Any], router: EchoRouter, value: str
) -> None:
    response = await client.post(INFER, json={"id": value, "inputs": [INPUT]})
    assert response.status == 400
    assert (await response.json())["error"].startswith("id: must")
    assert router.seen == []


async def test_the_binary_extensions_json_header_id_is_checked_too(
    client: TestClient[Any, Any], router: EchoRouter
) -> None:
    header = orjson.dumps({"id": "a\nb", "inputs": [
        {"name": "features", "datatype": "FP32", "shape": [1, 1],
         "parameters": {"binary_data_size": 4}},
    ]})
    response = await client.post(INFER, data=header + b"\0\0\0\0", headers={
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    })
    assert response.status == 400
    assert (await response.json())["error"].startswith("id: must be printable ASCII")
    assert router.seen == []


@pytest.mark.parametrize("value", ["order 42/retry-1", "x" * MAX_REQUEST_ID])
async def test_a_printable_ascii_id_is_echoed(client: TestClient[Any, Any], value: str) -> None:
    response = await client.post(INFER, json={"id": value, "inputs": [INPUT]})
    assert response.status == 200
    assert response.headers["X-Request-Id"] == value
    assert (await response.json())["id"] == value


async def test_a_request_id_header_of_raw_bytes_is_400_naming_the_header(
    client: TestClient[Any, Any], router: EchoRouter
) -> None:
    status, body = await raw_post(client, b"X-Request-Id: \xff\xfe\r\n")
    assert status == 400
    assert body["error"] == (
        "X-Request-Id header: must be printable ASCII (0x20 to 0x7e), character 1 is "
        "the byte 0xff, which is not UTF-8"
    )
    assert router.seen == []


async def test_a_long_request_id_header_is_400(client: TestClient[Any, Any]) -> None:
    response = await client.post(INFER, json={"inputs": [INPUT]},
                                 headers={"X-Request-Id": "x" * 200})
    assert response.status == 400
    assert (await response.json())["error"] == (
        "X-Request-Id header: must be 1 to 128 characters, got 200"
    )


@pytest.mark.parametrize(("header", "name"), [
    (b"Authorization: Bearer imk_", "Authorization"), (b"X-Api-Key: imk_", "x-api-key"),
])
async def test_an_api_key_of_raw_bytes_is_401_naming_the_header(
    header: bytes, name: str
) -> None:
    config = echo_config()
    key_id = add_tenant(config, "acme").split("_")[1]
    core = Gateway(ModelCatalog(config), EchoRouter(), access=Access(config))
    async with TestClient(TestServer(create_app(core))) as client:
        status, body = await raw_post(client, header + key_id.encode() + b"_\xff\xfe\r\n")
    assert status == 401
    assert body["error"].startswith(f"malformed {name} header: a key is printable ASCII")


@pytest.mark.parametrize("value", [v for v in BAD_IDS if v])
async def test_a_grpc_request_id_that_cannot_be_used_is_invalid_argument(
    router: EchoRouter, value: str
) -> None:
    server, port = create_grpc_server(echo_gateway(router), host="127.0.0.1", port=0)
    await server.start()
    request = pb.ModelInferRequest(model_name="echo", id=value, inputs=[
        pb.ModelInferRequest.InferInputTensor(
            name="features", datatype="FP32", shape=[1, 1],
            contents=pb.InferTensorContents(fp32_contents=[1.0]),
        ),
    ])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(request)
    finally:
        await server.stop(None)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("id: must")
    assert router.seen == []


@pytest.mark.parametrize("value", BAD_IDS)
def test_check_request_id_names_the_field(value: str) -> None:
    with pytest.raises(InvalidInput, match="^X-Request-Id header: must"):
        check_request_id(value, field="X-Request-Id header")


def test_check_request_id_returns_a_good_id() -> None:
    assert check_request_id("a b~!", field="id") == "a b~!"
