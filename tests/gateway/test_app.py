"""The gateway's REST adapter through aiohttp's test client, with a fake router behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InfermeshError, Overloaded
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    BatchingPolicy,
    InferRequest,
    InferResponse,
    ModelVersion,
    Signature,
    TensorSpec,
)
from tests.fakes import model_records

SIGNATURE = Signature(
    inputs=(TensorSpec("features", "FP32", (-1, 2)),),
    outputs=(TensorSpec("probs", "FP32", (-1, 2)),),
)
BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}


class FakeRouter:
    """Echoes the inputs back as `probs`, or raises the error it was given."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []
        self.error: InfermeshError | None = None

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        if self.error is not None:
            raise self.error
        outputs = [Tensor("probs", t.datatype, t.shape, t.data) for t in request.inputs]
        return InferResponse(request.model, request.version or "1", "router-id", outputs)


def spec(version: str) -> ModelVersion:
    return ModelVersion(
        "m", version, SIGNATURE, "file:///dev/null", "0" * 64,
        batching=BatchingPolicy(max_batch_size=4),
    )


@pytest.fixture
def config() -> StaticConfig:
    return StaticConfig(model_records("m", SIGNATURE, versions=("1", "2"), max_batch_size=4))


@pytest.fixture
def router() -> FakeRouter:
    return FakeRouter()


ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_client(config: StaticConfig, router: FakeRouter) -> AsyncIterator[ClientFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def make(
        registry: CollectorRegistry | None = None, **app_options: Any
    ) -> TestClient[Any, Any]:
        core = Gateway(ModelCatalog(config), router, access=Access(config, auth=False),
                       metrics=GatewayMetrics(registry))
        app = create_app(core, **app_options)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[Any, Any]:
    return await make_client()


async def test_server_metadata(client: TestClient[Any, Any]) -> None:
    response = await client.get("/v2")
    assert response.status == 200
    assert (await response.json())["name"] == "infermesh"


async def test_live(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/v2/health/live")).status == 200


async def test_ready_waits_for_a_worker_serving_the_stable_version(
    client: TestClient[Any, Any], config: StaticConfig
) -> None:
    assert (await client.get("/v2/health/ready")).status == 503
    config.put("endpoints/worker/w1", {"models": ["m/1"]})
    assert (await client.get("/v2/health/ready")).status == 200


async def test_a_registered_model_without_a_rollout_does_not_break_readiness(
    client: TestClient[Any, Any], config: StaticConfig
) -> None:
    config.put("endpoints/worker/w1", {"models": ["m/1"]})
    config.put("models/draft/1", spec("1").to_json() | {"model": "draft"})
    assert (await client.get("/v2/health/ready")).status == 200


async def test_model_metadata(client: TestClient[Any, Any]) -> None:
    response = await client.get("/v2/models/m")
    assert response.status == 200
    assert await response.json() == {
        "name": "m",
        "versions": ["1", "2"],
        "platform": "pytorch_torchscript",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}],
    }


async def test_model_metadata_of_a_named_version(client: TestClient[Any, Any]) -> None:
    response = await client.get("/v2/models/m/versions/2")
    assert response.status == 200
    assert (await response.json())["name"] == "m"
    missing = await client.get("/v2/models/m/versions/9")
    assert missing.status == 404
    assert "'9'" in (await missing.json())["error"]


async def test_model_ready(client: TestClient[Any, Any], config: StaticConfig) -> None:
    assert (await client.get("/v2/models/m/ready")).status == 503
    config.put("endpoints/worker/w1", {"models": ["m/2"]})
    assert (await client.get("/v2/models/m/ready")).status == 503
    assert (await client.get("/v2/models/m/versions/2/ready")).status == 200


async def test_infer_happy_path(client: TestClient[Any, Any], router: FakeRouter) -> None:
    response = await client.post("/v2/models/m/infer", json={**BODY, "id": "client-1"})
    assert response.status == 200
    body = await response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("m", "1", "client-1")
    assert body["outputs"] == [
        {"name": "probs", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}
    ]
    assert response.headers["X-Request-Id"] == "client-1"
    assert [r.version for r in router.seen] == [None]


async def test_infer_echoes_the_callers_request_id_header(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/v2/models/m/versions/2/infer", json=BODY, headers={"X-Request-Id": "trace-me"}
    )
    assert response.status == 200
    body = await response.json()
    assert (body["id"], body["model_version"]) == ("trace-me", "2")
    assert response.headers["X-Request-Id"] == "trace-me"


async def test_infer_assigns_a_request_id(client: TestClient[Any, Any]) -> None:
    response = await client.post("/v2/models/m/infer", json=BODY)
    body = await response.json()
    assert body["id"] and response.headers["X-Request-Id"] == body["id"]


async def test_unknown_model_is_404_naming_it(
    client: TestClient[Any, Any], router: FakeRouter
) -> None:
    response = await client.post("/v2/models/nope/infer", json=BODY)
    assert response.status == 404
    assert "'nope'" in (await response.json())["error"]
    assert router.seen == []


async def test_malformed_json_is_400(client: TestClient[Any, Any], router: FakeRouter) -> None:
    response = await client.post(
        "/v2/models/m/infer", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert "JSON" in (await response.json())["error"]
    assert router.seen == []


async def test_wrong_shape_is_400_naming_the_input(
    client: TestClient[Any, Any], router: FakeRouter
) -> None:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3],
                        "data": [1, 2, 3]}]}
    response = await client.post("/v2/models/m/infer", json=body)
    assert response.status == 400
    assert "'features'" in (await response.json())["error"]
    assert router.seen == []


async def test_a_zero_row_input_is_400_naming_the_input(
    client: TestClient[Any, Any], router: FakeRouter
) -> None:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [0, 2], "data": []}]}
    response = await client.post("/v2/models/m/infer", json=body)
    assert response.status == 400
    assert "input 'features': 0 rows" in (await response.json())["error"]
    assert router.seen == []


async def test_an_oversize_body_is_413_with_a_json_error(make_client: ClientFactory) -> None:
    client = await make_client(max_body_bytes=1000)
    data = list(range(600))
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [300, 2],
                        "data": data}]}
    response = await client.post("/v2/models/m/infer", json=body)
    assert response.status == 413
    assert response.content_type == "application/json"
    assert (await response.json())["error"]


async def test_an_overloaded_router_is_503_with_retry_after(
    client: TestClient[Any, Any], router: FakeRouter
) -> None:
    router.error = Overloaded("queue for m/1 is full", retry_after=2)
    response = await client.post("/v2/models/m/infer", json=BODY)
    assert response.status == 503
    assert response.headers["Retry-After"] == "2"
    assert "full" in (await response.json())["error"]


def rest_requests(registry: CollectorRegistry, model: str, code: str) -> float | None:
    labels = {"model": model, "code": code, "protocol": "rest"}
    return registry.get_sample_value("infermesh_gateway_requests_total", labels)


async def test_a_rejected_oversize_body_is_counted_with_its_status(
    make_client: ClientFactory,
) -> None:
    registry = CollectorRegistry()
    client = await make_client(max_body_bytes=1000, registry=registry)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [300, 2],
                        "data": list(range(600))}]}
    assert (await client.post("/v2/models/m/infer", json=body)).status == 413
    assert rest_requests(registry, "m", "413") == 1
    assert rest_requests(registry, "m", "200") is None


async def test_requests_are_counted_by_status(make_client: ClientFactory) -> None:
    registry = CollectorRegistry()
    client = await make_client(registry=registry)
    assert (await client.post("/v2/models/m/infer", json=BODY)).status == 200
    assert (await client.post("/v2/models/m/infer", data=b"{")).status == 400
    assert rest_requests(registry, "m", "200") == 1
    assert rest_requests(registry, "m", "400") == 1


async def test_unknown_model_names_share_one_metrics_label(make_client: ClientFactory) -> None:
    registry = CollectorRegistry()
    client = await make_client(registry=registry)
    for name in ("scan-1", "scan-2", "scan-3"):
        assert (await client.post(f"/v2/models/{name}/infer", json=BODY)).status == 404
    assert rest_requests(registry, "_unknown", "404") == 3
    assert rest_requests(registry, "scan-1", "404") is None
