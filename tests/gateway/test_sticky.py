"""The rollout's sticky key from headers or gRPC metadata, and the served version back to the
client in headers or gRPC metadata; over the echo router."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.grpc_app import create_grpc_server
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, Rollout, Route
from tests.gateway.echo import EchoRouter, echo_config

STICKY = Rollout("echo", (Route("1", 100.0),), sticky_key="user", fallback="1", epoch=9)
BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
SERVED = {"bucket": 4321, "rollout_epoch": 9, "fallback": True}


@pytest.fixture
def config() -> StaticConfig:
    config = echo_config()
    config.put("rollouts/echo", STICKY.to_json())
    return config


@pytest.fixture
def router() -> EchoRouter:
    return EchoRouter()


@pytest.fixture
def gateway(config: StaticConfig, router: EchoRouter) -> Gateway:
    return Gateway(ModelCatalog(config), router, access=Access(config, auth=False))


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    client = TestClient(TestServer(create_app(gateway)))
    await client.start_server()
    yield client
    await client.close()


@pytest.fixture
async def stub(gateway: Gateway) -> AsyncIterator[Any]:
    server, port = create_grpc_server(gateway, host="127.0.0.1", port=0)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    await server.stop(grace=None)


def infer_request(version: str | None = None, **parameters: object) -> InferRequest:
    tensor = Tensor.from_array("features", np.zeros((1, 2), dtype=np.float32))
    return InferRequest(model="echo", inputs=[tensor], request_id="r", version=version,
                        parameters=dict(parameters))


def grpc_request(**parameters: str) -> Any:
    message = pb.ModelInferRequest(model_name="echo", id="g")
    message.inputs.add(name="features", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.zeros(2, dtype="<f4").tobytes())
    for key, value in parameters.items():
        message.parameters[key].string_param = value
    return message


async def infer(gateway: Gateway, request: InferRequest, lookups: Lookups) -> None:
    with gateway.admit(request.model, request.version, header=lookups) as admission:
        await gateway.infer(request, admission=admission, header=lookups)


class Lookups:
    """A header lookup that records what it was asked."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.asked: list[str] = []

    def __call__(self, name: str) -> str | None:
        self.asked.append(name)
        return self.headers.get(name)


async def test_the_core_takes_the_sticky_key_from_a_header(
    gateway: Gateway, router: EchoRouter
) -> None:
    lookups = Lookups({"user": "alice"})
    await infer(gateway, infer_request(), lookups)
    assert router.seen[0].parameters["user"] == "alice"
    assert [name for name in lookups.asked if name != "traceparent"] == [
        "x-user-id", "x-session-id", "user"
    ]


async def test_no_lookup_for_a_pinned_version_nor_for_a_parameter_the_request_set(
    gateway: Gateway, router: EchoRouter
) -> None:
    lookups = Lookups({"user": "alice", "x-user-id": "u1"})
    await infer(gateway, infer_request(version="1"), lookups)
    await infer(gateway, infer_request(user="bob"), lookups)
    assert [name for name in lookups.asked if name != "traceparent"] == [
        "x-user-id", "x-session-id"
    ]
    assert [r.parameters for r in router.seen] == [{}, {"user": "bob", "x-user-id": "u1"}]


async def test_configured_headers_are_forwarded_whatever_the_gateways_rollout_says(
    config: StaticConfig, router: EchoRouter
) -> None:
    """The router's rollout may already name a header this gateway's copy does not: the
    router, not the gateway, decides which forwarded value it hashes."""
    config.put("rollouts/echo", Rollout.stable("echo", "1").to_json())
    gateway = Gateway(ModelCatalog(config), router, access=Access(config, auth=False),
                      sticky_headers=("X-Team",))
    lookups = Lookups({"x-team": "blue", "user": "alice"})
    await infer(gateway, infer_request(), lookups)
    assert router.seen[0].parameters == {"x-team": "blue"}
    config.put("rollouts/echo", STICKY.to_json())
    lookups.headers["x-team"] = "t" * 1000
    await infer(gateway, infer_request(), lookups)
    assert router.seen[1].parameters == {"x-team": "t" * 256, "user": "alice"}


async def test_rest_takes_the_sticky_key_from_a_header_of_any_case(
    client: TestClient[Any, Any], router: EchoRouter
) -> None:
    response = await client.post("/v2/models/echo/infer", json=BODY, headers={"USER": "alice"})
    assert response.status == 200
    assert router.seen[0].parameters["user"] == "alice"


async def test_rest_the_parameter_wins_over_the_header(
    client: TestClient[Any, Any], router: EchoRouter
) -> None:
    body = {**BODY, "parameters": {"user": "bob"}}
    response = await client.post("/v2/models/echo/infer", json=body, headers={"user": "alice"})
    assert response.status == 200
    assert router.seen[0].parameters["user"] == "bob"


async def test_grpc_takes_the_sticky_key_from_metadata(stub: Any, router: EchoRouter) -> None:
    await stub.ModelInfer(grpc_request(), metadata=(("user", "alice"),))
    await stub.ModelInfer(grpc_request(user="bob"), metadata=(("user", "alice"),))
    assert [r.parameters["user"] for r in router.seen] == ["alice", "bob"]


async def test_a_grpc_stream_takes_the_sticky_key_from_its_metadata(
    stub: Any, router: EchoRouter
) -> None:
    call = stub.ModelStreamInfer(iter([grpc_request()]), metadata=(("user", "carol"),))
    answers = [answer async for answer in call]
    assert [a.error_message for a in answers] == [""]
    assert router.seen[0].parameters["user"] == "carol"


async def test_rest_headers_name_the_served_version_bucket_and_epoch(
    client: TestClient[Any, Any], router: EchoRouter
) -> None:
    router.version, router.parameters = "2", SERVED
    response = await client.post("/v2/models/echo/infer", json=BODY)
    assert response.status == 200
    assert response.headers["Infermesh-Model-Version"] == "2"
    assert response.headers["Infermesh-Bucket"] == "4321"
    assert response.headers["Infermesh-Rollout-Epoch"] == "9"
    assert response.headers["Infermesh-Fallback"] == "true"
    parameters = (await response.json())["parameters"]
    assert parameters == {**SERVED, "trace_id": response.headers["Infermesh-Trace-Id"]}
    assert len(parameters["trace_id"]) == 32


async def test_rest_headers_without_a_rollout_choice(
    client: TestClient[Any, Any], router: EchoRouter
) -> None:
    response = await client.post("/v2/models/echo/versions/1/infer", json=BODY)
    assert response.headers["Infermesh-Model-Version"] == "1"
    assert not {"Infermesh-Bucket", "Infermesh-Fallback"} & set(response.headers)


async def test_grpc_metadata_and_message_name_the_served_version(
    stub: Any, router: EchoRouter
) -> None:
    router.version, router.parameters = "2", {"bucket": 17, "rollout_epoch": 9}
    call = stub.ModelInfer(grpc_request())
    response = await call
    metadata = dict(await call.trailing_metadata())
    assert (metadata["infermesh-model-version"], metadata["infermesh-bucket"],
            metadata["infermesh-rollout-epoch"]) == ("2", "17", "9")
    assert "infermesh-fallback" not in metadata
    assert response.model_version == "2"
    assert response.parameters["bucket"].int64_param == 17
    assert response.parameters["rollout_epoch"].int64_param == 9


async def test_a_grpc_stream_response_names_the_served_version(
    stub: Any, router: EchoRouter
) -> None:
    router.version, router.parameters = "2", SERVED
    [answer] = [a async for a in stub.ModelStreamInfer(iter([grpc_request()]))]
    response = answer.infer_response
    assert response.model_version == "2"
    assert response.parameters["bucket"].int64_param == 4321
    assert response.parameters["rollout_epoch"].int64_param == 9
    assert response.parameters["fallback"].bool_param is True


async def test_a_clients_traceparent_continues_its_trace_on_both_protocols(
    stub: Any, client: TestClient[Any, Any], router: EchoRouter
) -> None:
    """The request's trace context (REST header or gRPC metadata) reaches the router as the
    parent of the next hop, and the response names the trace."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    call = stub.ModelInfer(grpc_request(), metadata=(("traceparent", parent),))
    response = await call
    assert response.parameters["trace_id"].string_param == trace_id
    assert dict(await call.trailing_metadata())["infermesh-trace-id"] == trace_id
    rest = await client.post("/v2/models/echo/infer", json=BODY, headers={"traceparent": parent})
    assert rest.headers["Infermesh-Trace-Id"] == trace_id
    for seen in router.seen:
        hop = seen.trace["traceparent"]
        assert hop.startswith(f"00-{trace_id}-") and not hop.startswith(parent[:-2])
    fresh = await client.post("/v2/models/echo/infer", json=BODY, headers={"traceparent": "bad"})
    assert fresh.status == 200 and fresh.headers["Infermesh-Trace-Id"] != trace_id


async def test_an_error_response_names_its_trace_on_both_protocols(
    stub: Any, client: TestClient[Any, Any]
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-00"
    bad = {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    rest = await client.post("/v2/models/echo/infer", json=bad, headers={"traceparent": parent})
    assert rest.status == 400 and rest.headers["Infermesh-Trace-Id"] == trace_id
    message = grpc_request()
    message.inputs[0].name = "nope"
    call = stub.ModelInfer(message, metadata=(("traceparent", parent),))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert dict(failed.value.trailing_metadata())["infermesh-trace-id"] == trace_id
