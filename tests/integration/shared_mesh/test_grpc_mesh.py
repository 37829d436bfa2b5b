"""Stock tritonclient.grpc (sync and aio), unmodified, against the gateway of the full mesh."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import RunningMesh
from tests.integration.oip import infer_body, mlp_input, output_array, post_infer, reference


def features(array: np.ndarray, module: Any = aioclient) -> Any:
    tensor = module.InferInput("features", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def first_output(result: Any) -> np.ndarray:
    output: np.ndarray = result.as_numpy(result.get_response().outputs[0].name)
    return output


@pytest.fixture
async def client(mesh: RunningMesh) -> AsyncIterator[Any]:
    client = aioclient.InferenceServerClient(url=mesh.grpc)
    yield client
    await client.close()


async def test_metadata_and_readiness(client: Any) -> None:
    assert await client.is_server_live() and await client.is_server_ready()
    assert await client.is_model_ready("mlp")
    assert (await client.get_server_metadata()).name == "infermesh"
    metadata = await client.get_model_metadata("mlp")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("features", "FP32", [-1, 32])
    ]


async def test_sync_client_matches_rest_and_the_model_in_process(mesh: RunningMesh) -> None:
    array = mlp_input(3, seed=11)

    def infer() -> Any:
        client = grpcclient.InferenceServerClient(url=mesh.grpc)
        try:
            return client.infer("mlp", [features(array, grpcclient)], request_id="grpc-1")
        finally:
            client.close()

    result = await asyncio.to_thread(infer)
    assert result.get_response().id == "grpc-1"
    assert result.get_response().model_version == "1"
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post_infer(
            session, f"{mesh.gateway}/v2/models/mlp/infer", infer_body("features", array)
        )
    assert status == 200, body
    np.testing.assert_allclose(first_output(result), output_array(body), rtol=1e-6, atol=1e-7)
    expected = reference(mesh.state_dir, "mlp", array)
    np.testing.assert_allclose(first_output(result), expected, rtol=1e-5, atol=1e-6)


async def test_an_aio_stream_of_100_requests(client: Any, mesh: RunningMesh) -> None:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(100):
            yield {"model_name": "mlp", "inputs": [features(mlp_input(1, seed=i))],
                   "request_id": f"s{i}"}

    answered: dict[str, np.ndarray] = {}
    async with asyncio.timeout(60):
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            answered[result.get_response().id] = first_output(result)
            if len(answered) == 100:
                break
    assert sorted(answered) == sorted(f"s{i}" for i in range(100))
    expected = reference(mesh.state_dir, "mlp", np.concatenate(
        [mlp_input(1, seed=i) for i in range(100)]
    ))
    for i in range(100):
        np.testing.assert_allclose(answered[f"s{i}"][0], expected[i], rtol=1e-5, atol=1e-6)


async def test_a_sync_stream_of_100_requests(mesh: RunningMesh) -> None:
    def stream() -> dict[str, Any]:
        answered: dict[str, Any] = {}
        done = threading.Event()

        def callback(result: Any, error: Any) -> None:
            answered[result.get_response().id if error is None else "error"] = error
            if len(answered) == 100:
                done.set()

        client = grpcclient.InferenceServerClient(url=mesh.grpc)
        client.start_stream(callback)
        for i in range(100):
            client.async_stream_infer("mlp", [features(mlp_input(1, seed=i), grpcclient)],
                                      request_id=f"t{i}")
        done.wait(60)
        client.stop_stream()
        client.close()
        return answered

    answered = await asyncio.to_thread(stream)
    assert answered == {f"t{i}": None for i in range(100)}


async def test_errors_surface_as_the_clients_exception(client: Any) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        await client.infer("nope", [features(mlp_input(1))])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "'nope'" in unknown.value.message()
    with pytest.raises(InferenceServerException) as bad_shape:
        await client.infer("mlp", [features(np.zeros((1, 31), dtype=np.float32))])
    assert bad_shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'features'" in bad_shape.value.message()
