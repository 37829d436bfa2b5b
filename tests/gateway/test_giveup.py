"""A client that gives up gives its tenant's concurrency slot back at once.

The router here never answers the first request. Its client then goes away: over REST it
closes the connection, over gRPC it cancels the call. The tenant may hold one request at a
time (max_concurrency 1), so a second request is admitted only once the first one's slot is
free again, which must not wait for the abandoned request's 30 s deadline.

REST runs on the runner every service uses (`runtime.app_runner`), not the test server's, as
whether a closed connection cancels the handler is the runner's setting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from aiohttp import web
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.grpc_app import create_grpc_server
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.types import InferRequest, InferResponse
from services.mesh.infra.runtime import app_runner, bind
from tests.gateway.echo import EchoRouter, echo_config
from tests.gateway.tenancy import FakeClock, add_tenant, bearer
from tests.waiting import wait_for

BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}


class StuckRouter(EchoRouter):
    """Never answers while `stuck`; echoes otherwise. `entered` is set by a stuck call."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = True
        self.entered = asyncio.Event()
        self.cancelled = 0

    async def infer(self, request: InferRequest) -> InferResponse:
        if self.stuck:
            self.entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return await super().infer(request)


@pytest.fixture
def config() -> StaticConfig:
    return echo_config()


@pytest.fixture
def router() -> StuckRouter:
    return StuckRouter()


@pytest.fixture
def key(config: StaticConfig) -> str:
    return add_tenant(config, "solo", max_concurrency=1)


@pytest.fixture
def core(config: StaticConfig, router: StuckRouter) -> Gateway:
    return Gateway(ModelCatalog(config), router, access=Access(config, clock=FakeClock()))


@pytest.fixture
async def base_url(core: Gateway) -> AsyncIterator[str]:
    sock = bind("127.0.0.1", 0)
    runner = app_runner(create_app(core), drain_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()
    sock.close()


async def _post(url: str, key: str) -> int:
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/v2/models/echo/infer", json=BODY, headers=bearer(key)
    ) as response:
        await response.read()
        return response.status


async def test_a_rest_client_that_closes_its_connection_frees_its_slot(
    base_url: str, key: str, router: StuckRouter
) -> None:
    abandoned = asyncio.create_task(_post(base_url, key))
    async with asyncio.timeout(10):
        await router.entered.wait()
    assert await _post(base_url, key) == 429, "the tenant's one slot should be taken"
    router.stuck = False
    abandoned.cancel()  # closes its session, and with it the connection
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    await wait_for(lambda: _post(base_url, key), lambda status: status == 200, timeout=10,
                   what="a new request admitted once the abandoned one's slot is free")
    assert router.cancelled == 1, "the abandoned request kept running in the gateway"


@pytest.fixture
async def stub(core: Gateway) -> AsyncIterator[Any]:
    server, port = create_grpc_server(core, host="127.0.0.1", port=0)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    await server.stop(grace=None)


def _echo_request() -> Any:
    message = pb.ModelInferRequest(model_name="echo", id="g")
    message.inputs.add(name="features", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.zeros(2, dtype="<f4").tobytes())
    return message


async def _grpc_code(stub: Any, key: str) -> grpc.StatusCode:
    try:
        await stub.ModelInfer(_echo_request(), metadata=(("authorization", f"Bearer {key}"),))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_cancelled_grpc_call_frees_its_slot(
    stub: Any, key: str, router: StuckRouter
) -> None:
    call = stub.ModelInfer(_echo_request(), metadata=(("authorization", f"Bearer {key}"),))
    async with asyncio.timeout(10):
        await router.entered.wait()
    assert await _grpc_code(stub, key) == grpc.StatusCode.RESOURCE_EXHAUSTED
    router.stuck = False
    call.cancel()
    await wait_for(lambda: _grpc_code(stub, key), lambda code: code == grpc.StatusCode.OK,
                   timeout=10, what="a new call admitted once the cancelled one's slot is free")
    assert router.cancelled == 1, "the cancelled call kept running in the gateway"
