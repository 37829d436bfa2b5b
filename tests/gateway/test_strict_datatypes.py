"""JSON tensor data through the REST adapter is strict about its datatype: no silent coercion."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.types import InferRequest, InferResponse, Signature, TensorSpec
from tests.fakes import model_records

SIGNATURE = Signature(
    inputs=(TensorSpec("features", "FP32", (-1, 2)),),
    outputs=(TensorSpec("features", "FP32", (-1, 2)),),
)


class EchoRouter:
    """Echoes the inputs back and records every request that reached it."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        return InferResponse(request.model, request.version or "1", "id", list(request.inputs))


@pytest.fixture
def router() -> EchoRouter:
    return EchoRouter()


@pytest.fixture
async def client(router: EchoRouter) -> AsyncIterator[TestClient[Any, Any]]:
    config = StaticConfig(model_records("m", SIGNATURE, versions=("1",), max_batch_size=4))
    core = Gateway(
        ModelCatalog(config),
        router,
        access=Access(config, auth=False),
        metrics=GatewayMetrics(None),
    )
    client = TestClient(TestServer(create_app(core)))
    await client.start_server()
    yield client
    await client.close()


def _body(data: list[Any]) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 2], "data": data}]}


@pytest.mark.parametrize(
    ("data", "offence"),
    [
        ([1, 2, 3, "1.5"], 'data[3] is "1.5", FP32 takes numbers'),
        ([[1, 2], [None, 4]], "data[2] is null, FP32 takes numbers"),
        ([1, 2, 3, 1e39], "data[3] is 1e+39, FP32 takes numbers within"),
    ],
)
async def test_a_coercible_but_wrong_element_is_400_naming_input_and_element(
    client: TestClient[Any, Any], router: EchoRouter, data: list[Any], offence: str
) -> None:
    response = await client.post("/v2/models/m/infer", json=_body(data))
    assert response.status == 400
    assert offence in (await response.json())["error"]
    assert "input 'features'" in (await response.json())["error"]
    assert router.seen == []


async def test_valid_numbers_still_pass(client: TestClient[Any, Any]) -> None:
    response = await client.post("/v2/models/m/infer", json=_body([[1, 2.5], [3, 4]]))
    assert response.status == 200
    assert (await response.json())["outputs"][0]["data"] == [1.0, 2.5, 3.0, 4.0]
