"""The HTTP/2 edge in front of the running mesh: REST over h2c (httpx) and gRPC through nginx."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import tritonclient.grpc as grpcclient

from tests.integration.conftest import RunningMesh
from tests.integration.oip import infer_body, mlp_input, output_array, reference


async def test_rest_over_http2_through_the_edge(mesh: RunningMesh) -> None:
    features = mlp_input(2, seed=11)
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        answer = await client.post(
            f"http://127.0.0.1:{mesh.edge_port}/v2/models/mlp/infer",
            content=infer_body("features", features), headers={"X-Request-Id": "edge-1"},
        )
    assert answer.http_version == "HTTP/2" and answer.status_code == 200, answer.text
    body = orjson.loads(answer.content)
    assert body["id"] == "edge-1" and answer.headers["x-request-id"] == "edge-1"
    expected = reference(mesh.state_dir, "mlp", features)
    np.testing.assert_allclose(output_array(body), expected, rtol=1e-5, atol=1e-6)


def _grpc_infer(address: str, features: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(address)
    try:
        tensor = grpcclient.InferInput("features", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features)
        result = client.infer("mlp", [tensor], request_id="edge-grpc")
        assert result.get_response().id == "edge-grpc"
        array: np.ndarray = result.as_numpy("probs")
        return array
    finally:
        client.close()


async def test_grpc_through_the_edge(mesh: RunningMesh) -> None:
    features = mlp_input(3, seed=12)
    got = await asyncio.to_thread(_grpc_infer, f"127.0.0.1:{mesh.edge_port}", features)
    expected = reference(mesh.state_dir, "mlp", features)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
