"""Auth and quotas through the gRPC adapter: status codes, the retry-after trailer, streams,
the RPCs that stay open, and gRPC requests on /metrics; a grpc.aio server on a socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.gateway.access import Access
from services.gateway.core import Gateway
from services.gateway.grpc_app import create_grpc_server
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import FakeClock, add_tenant

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
def config() -> StaticConfig:
    return echo_config()


@pytest.fixture
def router() -> EchoRouter:
    return EchoRouter()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def address(
    config: StaticConfig, router: EchoRouter, registry: CollectorRegistry
) -> AsyncIterator[str]:
    core = Gateway(ModelCatalog(config), router, access=Access(config, clock=FakeClock()),
                   metrics=GatewayMetrics(registry))
    server, port = create_grpc_server(core, host="127.0.0.1", port=0)
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)


@pytest.fixture
async def stub(address: str) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def echo_request(model: str = "echo") -> Any:
    message = pb.ModelInferRequest(model_name=model, id="g")
    message.inputs.add(name="features", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.zeros(2, dtype="<f4").tobytes())
    return message


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_model_infer_needs_a_valid_key(
    stub: Any, config: StaticConfig, router: EchoRouter
) -> None:
    key = add_tenant(config, "acme", priority_class="bulk")
    for metadata in ((), (("authorization", "Bearer imk_000000000000_nope"),)):
        error = await refused(stub.ModelInfer(echo_request(), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.ModelInfer(echo_request(), metadata=bearer(key))
    await stub.ModelInfer(echo_request(), metadata=(("x-api-key", key),))
    assert [(r.tenant, r.lane) for r in router.seen] == [("acme", "bulk")] * 2


async def test_a_forbidden_model_is_permission_denied(stub: Any, config: StaticConfig) -> None:
    key = add_tenant(config, "acme", allowed_models=["pair"])
    error = await refused(stub.ModelInfer(echo_request(), metadata=bearer(key)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'echo'" in (error.details() or "")


async def test_over_quota_is_resource_exhausted_with_a_retry_after_trailer(
    stub: Any, config: StaticConfig
) -> None:
    key = add_tenant(config, "acme", rate=0.4, burst=1)
    await stub.ModelInfer(echo_request(), metadata=bearer(key))
    error = await refused(stub.ModelInfer(echo_request(), metadata=bearer(key)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'acme'" in (error.details() or "")
    assert dict(error.trailing_metadata() or ())["retry-after"] == "3"  # 2.5 s, rounded up


async def test_a_stream_refuses_each_request_in_its_answer(
    stub: Any, config: StaticConfig
) -> None:
    key = add_tenant(config, "acme", rate=1, burst=2)
    call = stub.ModelStreamInfer(iter([echo_request() for _ in range(3)]), metadata=bearer(key))
    errors = sorted([answer.error_message async for answer in call])
    assert errors[:2] == ["", ""] and "'acme'" in errors[2]
    anonymous = stub.ModelStreamInfer(iter([echo_request()]))
    assert ["API key" in answer.error_message async for answer in anonymous] == [True]


async def test_model_rpcs_need_a_key_server_rpcs_stay_open(
    stub: Any, config: StaticConfig
) -> None:
    key = add_tenant(config, "acme")
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await stub.ServerMetadata(pb.ServerMetadataRequest())).name == "infermesh"
    for rpc, request in ((stub.ModelMetadata, pb.ModelMetadataRequest(name="echo")),
                         (stub.ModelReady, pb.ModelReadyRequest(name="echo"))):
        error = await refused(rpc(request))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        await rpc(request, metadata=bearer(key))


async def test_stock_tritonclient_sends_the_key_as_a_header(
    address: str, config: StaticConfig
) -> None:
    key = add_tenant(config, "acme")
    client = aioclient.InferenceServerClient(url=address)
    try:
        tensor = aioclient.InferInput("features", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 2), dtype=np.float32))
        headers = {"authorization": f"Bearer {key}"}
        result = await client.infer("echo", [tensor], headers=headers)
        assert result.as_numpy("features_echo").shape == (1, 2)
        with pytest.raises(InferenceServerException) as caught:
            await client.infer("echo", [tensor])
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    finally:
        await client.close()


async def test_grpc_requests_are_counted(
    stub: Any, config: StaticConfig, registry: CollectorRegistry
) -> None:
    key = add_tenant(config, "acme")
    await stub.ModelInfer(echo_request(), metadata=bearer(key))
    await refused(stub.ModelInfer(echo_request("scan-me")))
    count = registry.get_sample_value
    labels = {"protocol": "grpc"}
    assert count("infermesh_gateway_requests_total",
                 {**labels, "model": "echo", "code": "OK"}) == 1
    assert count("infermesh_gateway_requests_total",
                 {**labels, "model": "_unknown", "code": "UNAUTHENTICATED"}) == 1
    assert count("infermesh_gateway_auth_failures_total", {"reason": "missing"}) == 1
