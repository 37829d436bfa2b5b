"""The gateway's gRPC adapter through stock tritonclient (sync and aio), over a fake router."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.gateway.access import Access
from services.gateway.core import Gateway
from services.gateway.grpc_app import create_grpc_server
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InfermeshError, Overloaded, QuotaExceeded, Unavailable
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    Signature,
    TensorSpec,
)
from tests.fakes import model_records

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, -1)),), outputs=(TensorSpec("x", "FP32", (-1, -1)),),
)


class EchoRouter:
    """Echoes the inputs back as outputs; holds requests whose id is in `held`; raises `error`."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []
        self.error: InfermeshError | None = None
        self.held: dict[str, asyncio.Event] = {}

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        if request.request_id in self.held:
            await self.held[request.request_id].wait()
        if self.error is not None:
            raise self.error
        outputs = [Tensor(t.name, t.datatype, t.shape, t.data) for t in request.inputs]
        return InferResponse(request.model, request.version or "1", "router-id", outputs)


@pytest.fixture
def config() -> StaticConfig:
    return StaticConfig(model_records("echo", SIGNATURE, max_batch_size=1024))


@pytest.fixture
def router() -> EchoRouter:
    return EchoRouter()


ServerFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def make_server(config: StaticConfig, router: EchoRouter) -> AsyncIterator[ServerFactory]:
    servers: list[grpc.aio.Server] = []

    async def make(**options: Any) -> str:
        core = Gateway(ModelCatalog(config), router, access=Access(config, auth=False))
        server, port = create_grpc_server(core, host="127.0.0.1", port=0, **options)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield make
    for server in servers:
        await server.stop(grace=None)


@pytest.fixture
async def address(make_server: ServerFactory) -> str:
    return await make_server()


@pytest.fixture
async def client(address: str) -> AsyncIterator[Any]:
    client = aioclient.InferenceServerClient(url=address)
    yield client
    await client.close()


def echo_input(array: np.ndarray, module: Any = aioclient) -> Any:
    tensor = module.InferInput("x", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def small(seed: int) -> np.ndarray:
    return np.full((1, 3), seed, dtype=np.float32)


async def test_health_and_server_metadata(client: Any, config: StaticConfig) -> None:
    assert await client.is_server_live()
    assert not await client.is_server_ready()
    assert not await client.is_model_ready("echo")
    config.put("endpoints/worker/w1", {"models": ["echo/1"]})
    assert await client.is_server_ready()
    assert await client.is_model_ready("echo")
    metadata = await client.get_server_metadata()
    assert metadata.name == "infermesh"


async def test_model_metadata(client: Any) -> None:
    metadata = await client.get_model_metadata("echo")
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        "echo", ["1"], "pytorch_torchscript"
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("x", "FP32", [-1, -1])
    ]
    assert [t.name for t in metadata.outputs] == ["x"]


async def test_a_1mb_tensor_round_trips_byte_exact(client: Any) -> None:
    array = np.random.default_rng(0).standard_normal((4, 65536), dtype=np.float32)
    result = await client.infer("echo", [echo_input(array)], request_id="client-1")
    assert result.as_numpy("x").tobytes() == array.tobytes()
    assert result.get_response().id == "client-1"


async def test_a_request_without_an_id_gets_one(client: Any, router: EchoRouter) -> None:
    result = await client.infer("echo", [echo_input(small(1))])
    assert len(result.get_response().id) == 32
    assert router.seen[0].request_id == result.get_response().id


async def test_the_sync_client_infers_and_streams(address: str) -> None:
    def session() -> tuple[np.ndarray, dict[str, np.ndarray]]:
        client = grpcclient.InferenceServerClient(url=address)
        unary = client.infer("echo", [echo_input(small(7), grpcclient)]).as_numpy("x")
        answered: dict[str, np.ndarray] = {}
        done = threading.Event()

        def callback(result: Any, error: Any) -> None:
            assert error is None, error
            answered[result.get_response().id] = result.as_numpy("x")
            if len(answered) == 100:
                done.set()

        client.start_stream(callback)
        for i in range(100):
            client.async_stream_infer("echo", [echo_input(small(i), grpcclient)],
                                      request_id=f"r{i}")
        assert done.wait(10)
        client.stop_stream()
        client.close()
        return unary, answered

    unary, answered = await asyncio.to_thread(session)
    np.testing.assert_array_equal(unary, small(7))
    assert sorted(answered) == sorted(f"r{i}" for i in range(100))
    for i in range(100):
        np.testing.assert_array_equal(answered[f"r{i}"], small(i))


async def test_a_stream_answers_requests_as_they_complete(
    client: Any, router: EchoRouter
) -> None:
    router.held["r0"] = first = asyncio.Event()  # r0 finishes only after the 99 others

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(100):
            yield {"model_name": "echo", "inputs": [echo_input(small(i))],
                   "request_id": f"r{i}"}
        yield {"model_name": "nope", "inputs": [echo_input(small(0))], "request_id": "bad"}

    order: list[str] = []
    errors: list[str] = []
    async with asyncio.timeout(10):
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                errors.append(error.message())
            else:
                order.append(result.get_response().id)
                assert result.as_numpy("x")[0, 0] == int(order[-1][1:])
            if len(order) + len(errors) == 100:
                first.set()
            if len(order) == 100 and errors:
                break
    assert order[-1] == "r0" and sorted(order) == sorted(f"r{i}" for i in range(100))
    assert len(errors) == 1 and "'nope'" in errors[0]


async def test_unknown_model_is_not_found_with_our_message(client: Any) -> None:
    with pytest.raises(InferenceServerException) as caught:
        await client.infer("nope", [echo_input(small(1))])
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "'nope'" in caught.value.message()


async def test_the_sync_client_sees_not_found(address: str) -> None:
    def call() -> None:
        client = grpcclient.InferenceServerClient(url=address)
        try:
            client.get_model_metadata("nope")
        finally:
            client.close()

    with pytest.raises(InferenceServerException) as caught:
        await asyncio.to_thread(call)
    assert caught.value.status() == "StatusCode.NOT_FOUND"


async def test_bad_shape_is_invalid_argument_naming_the_input(client: Any) -> None:
    tensor = aioclient.InferInput("x", [6], "FP32")
    tensor.set_data_from_numpy(np.zeros(6, dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        await client.infer("echo", [tensor])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x'" in caught.value.message()


@pytest.mark.parametrize(("error", "status"), [
    (Overloaded("queue full", retry_after=1.0), "StatusCode.UNAVAILABLE"),
    (Unavailable("no ready worker"), "StatusCode.UNAVAILABLE"),
    (QuotaExceeded("tenant over quota", retry_after=2.0), "StatusCode.RESOURCE_EXHAUSTED"),
])
async def test_router_errors_map_to_grpc_status(
    client: Any, router: EchoRouter, error: InfermeshError, status: str
) -> None:
    router.error = error
    with pytest.raises(InferenceServerException) as caught:
        await client.infer("echo", [echo_input(small(1))])
    assert (caught.value.status(), caught.value.message()) == (status, error.message)


async def test_the_grpc_deadline_reaches_the_core(client: Any, router: EchoRouter) -> None:
    router.held["slow"] = asyncio.Event()  # never set
    started = time.time()
    with pytest.raises(InferenceServerException) as caught:
        await client.infer("echo", [echo_input(small(1))], request_id="slow",
                           client_timeout=0.05)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    deadline = router.seen[0].deadline
    assert deadline is not None and deadline < started + 1


async def test_gzip_requests_and_responses(make_server: ServerFactory) -> None:
    client = aioclient.InferenceServerClient(url=await make_server(compression="gzip"))
    try:
        array = np.zeros((4, 65536), dtype=np.float32)
        result = await client.infer("echo", [echo_input(array)], compression_algorithm="gzip")
        assert result.as_numpy("x").tobytes() == array.tobytes()
    finally:
        await client.close()


async def stub_infer(address: str, request: Any) -> Any:
    async with grpc.aio.insecure_channel(address) as channel:
        return await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)


def request_of(**tensor: Any) -> Any:
    request = pb.ModelInferRequest(model_name="echo", id="typed")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2], **tensor)
    return request


async def test_typed_contents_are_accepted(address: str) -> None:
    contents = pb.InferTensorContents(fp32_contents=[1.5, -2.0])
    response = await stub_infer(address, request_of(contents=contents))
    echoed = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    assert echoed.tolist() == [1.5, -2.0] and response.id == "typed"


@pytest.mark.parametrize(("raw", "problem"), [
    ([b"\0" * 4], "input 'x': 4 bytes of data"),
    ([b"\0" * 8, b"\0" * 8], "2 raw_input_contents for 1 inputs"),
])
async def test_malformed_raw_contents_are_invalid_argument(
    address: str, raw: list[bytes], problem: str
) -> None:
    request = request_of()
    request.raw_input_contents.extend(raw)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub_infer(address, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in caught.value.details()
