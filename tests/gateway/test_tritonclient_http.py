"""Stock tritonclient.http (sync) and tritonclient.http.aio against the REST adapter on a socket.

The sync client runs in a worker thread: async tests fail any blocking call on the loop.
Its geventhttpclient pool belongs to the thread that made it, so each check makes, uses and
closes its own client inside one `asyncio.to_thread` call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from aiohttp import web
from tritonclient.utils import InferenceServerException

from services.gateway.app import create_app
from tests.gateway.echo import EchoRouter, echo_gateway

T = TypeVar("T")
FEATURES = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=np.float32)
TEXT = np.array([b"h\xc3\xa9llo", b"\x00\xff"], dtype=object)  # only binary can carry \xff
UTF8_TEXT = np.array(["héllo", "w"], dtype=object)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    """host:port of the gateway's REST app over the echo models, on a real socket."""
    runner = web.AppRunner(create_app(echo_gateway(EchoRouter())))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"{host}:{port}"
    await runner.cleanup()


async def with_sync_client(url: str, check: Callable[[Any], T]) -> T:
    def run() -> T:
        client = httpclient.InferenceServerClient(url)
        try:
            return check(client)
        finally:
            client.close()

    return await asyncio.to_thread(run)


@pytest.fixture
async def aio(url: str) -> AsyncIterator[Any]:
    client = aioclient.InferenceServerClient(url)
    yield client
    await client.close()


def features_input(module: Any, array: np.ndarray, *, binary: bool) -> Any:
    tensor = module.InferInput("features", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def pair_inputs(module: Any, *, binary: bool) -> list[Any]:
    text = module.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(TEXT if binary else UTF8_TEXT, binary_data=binary)
    return [features_input(module, FEATURES, binary=binary), text]


# --- sync client -------------------------------------------------------------------------------

async def test_sync_metadata_and_readiness(url: str) -> None:
    def check(client: Any) -> tuple[Any, ...]:
        return (client.is_server_live(), client.is_server_ready(), client.is_model_ready("echo"),
                client.get_server_metadata(), client.get_model_metadata("pair"))

    live, ready, model_ready, server, model = await with_sync_client(url, check)
    assert (live, ready, model_ready) == (True, True, True)
    assert server["name"] == "infermesh" and "binary_tensor_data" in server["extensions"]
    assert [i["name"] for i in model["inputs"]] == ["features", "text"]
    assert model["versions"] == ["1"]


@pytest.mark.parametrize("binary", [False, True])
async def test_sync_infer_with_json_or_binary_tensors(url: str, binary: bool) -> None:
    def check(client: Any) -> tuple[np.ndarray, np.ndarray]:
        outputs = [httpclient.InferRequestedOutput("features_echo", binary_data=binary),
                   httpclient.InferRequestedOutput("text_echo", binary_data=binary)]
        result = client.infer("pair", pair_inputs(httpclient, binary=binary), outputs=outputs)
        return result.as_numpy("features_echo"), result.as_numpy("text_echo")

    features, text = await with_sync_client(url, check)
    np.testing.assert_array_equal(features, FEATURES)
    assert text.tolist() == (TEXT.tolist() if binary else ["héllo", "w"])


async def test_sync_a_1mb_tensor_round_trips_byte_exact(url: str) -> None:
    big = np.random.default_rng(7).standard_normal((1, 262144), dtype=np.float32)

    def check(client: Any) -> np.ndarray:
        result = client.infer("echo", [features_input(httpclient, big, binary=True)])
        echoed: np.ndarray = result.as_numpy("features_echo")
        return echoed

    assert (await with_sync_client(url, check)).tobytes() == big.tobytes()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
async def test_sync_compressed_requests_and_responses(url: str, algorithm: str) -> None:
    def check(client: Any) -> np.ndarray:
        result = client.infer(
            "echo", [features_input(httpclient, FEATURES, binary=True)],
            request_compression_algorithm=algorithm, response_compression_algorithm=algorithm,
        )
        echoed: np.ndarray = result.as_numpy("features_echo")
        return echoed

    np.testing.assert_array_equal(await with_sync_client(url, check), FEATURES)


async def test_sync_errors_carry_our_message(url: str) -> None:
    def check(client: Any) -> list[InferenceServerException]:
        errors = []
        for model, inputs in [
            ("nope", [features_input(httpclient, FEATURES, binary=True)]),
            ("pair", [features_input(httpclient, np.zeros((2, 3), np.float32), binary=True),
                      pair_inputs(httpclient, binary=True)[1]]),
        ]:
            with pytest.raises(InferenceServerException) as caught:
                client.infer(model, inputs)
            errors.append(caught.value)
        return errors

    unknown, bad_shape = await with_sync_client(url, check)
    assert unknown.status() == "404" and "'nope'" in unknown.message()
    assert bad_shape.status() == "400"
    assert "input 'features': shape [2, 3] does not match the model's [-1, 2]" in (
        bad_shape.message()
    )


# --- aio client --------------------------------------------------------------------------------

async def test_aio_metadata_and_readiness(aio: Any) -> None:
    assert await aio.is_server_live() and await aio.is_server_ready()
    assert await aio.is_model_ready("pair")
    assert (await aio.get_server_metadata())["name"] == "infermesh"
    assert (await aio.get_model_metadata("echo"))["outputs"][0]["name"] == "features_echo"


@pytest.mark.parametrize("binary", [False, True])
async def test_aio_infer_with_json_or_binary_tensors(aio: Any, binary: bool) -> None:
    outputs = [aioclient.InferRequestedOutput("features_echo", binary_data=binary),
               aioclient.InferRequestedOutput("text_echo", binary_data=True)]
    result = await aio.infer("pair", pair_inputs(aioclient, binary=binary), outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("features_echo"), FEATURES)
    sent = TEXT if binary else UTF8_TEXT
    assert result.as_numpy("text_echo").tolist() == [t.encode() if isinstance(t, str) else t
                                                     for t in sent.tolist()]


async def test_aio_a_1mb_tensor_round_trips_byte_exact_compressed(aio: Any) -> None:
    big = np.random.default_rng(8).standard_normal((1, 262144), dtype=np.float32)
    result = await aio.infer(
        "echo", [features_input(aioclient, big, binary=True)],
        request_compression_algorithm="gzip", response_compression_algorithm="gzip",
    )
    assert result.as_numpy("features_echo").tobytes() == big.tobytes()


async def test_aio_errors_carry_our_message(aio: Any) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        await aio.get_model_metadata("nope")
    assert unknown.value.status() == "404" and "'nope'" in unknown.value.message()
    with pytest.raises(InferenceServerException) as bad_shape:
        await aio.infer("echo", [features_input(aioclient, np.zeros(4, np.float32), binary=True)])
    assert bad_shape.value.status() == "400"
    assert "input 'features': shape [4]" in bad_shape.value.message()
