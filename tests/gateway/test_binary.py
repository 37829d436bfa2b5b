"""The OIP binary tensor extension and HTTP compression: the pure codec, then through the app."""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import create_app
from services.gateway.binary import HEADER_LENGTH, OutputFormat, output_format, split_body
from services.gateway.rest import decode_infer_body, encode_infer_parts
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import Tensor, deserialize_bytes, serialize_bytes
from services.mesh.domain.types import InferRequest, InferResponse
from tests.gateway.echo import EchoRouter, echo_gateway

FEATURES = np.array([[1.5, -2.0]], dtype=np.float32)
TEXT = serialize_bytes([b"h\xc3\xa9llo", b"\x00\xff"])  # one UTF-8, one not


def binary_body(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + b"".join(chunks), {HEADER_LENGTH: str(len(head))}


def binary_input(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape,
            "parameters": {"binary_data_size": size}}


def decode(body: bytes, header_length: str | None) -> InferRequest:
    request, _ = decode_infer_body(body, header_length=header_length, model="m", version=None,
                                   request_id="r")
    return request


# --- the pure codec ---------------------------------------------------------------------------

def test_a_body_without_a_header_length_is_all_json() -> None:
    header, tail = split_body(b'{"inputs": []}', None)
    assert (bytes(header), len(tail)) == (b'{"inputs": []}', 0)


def test_binary_inputs_are_views_of_the_body_not_copies() -> None:
    body, headers = binary_body(
        {"inputs": [binary_input("features", "FP32", [1, 2], 8)]}, FEATURES.tobytes()
    )
    [tensor] = decode(body, headers[HEADER_LENGTH]).inputs
    assert isinstance(tensor.data, memoryview) and tensor.data.obj is body
    np.testing.assert_array_equal(tensor.array(), FEATURES)


def test_binary_and_json_inputs_mix_in_input_order() -> None:
    body, headers = binary_body({"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]},
        binary_input("features", "FP32", [1, 2], 8),
        binary_input("more", "BYTES", [2], len(TEXT)),
    ]}, FEATURES.tobytes(), TEXT)
    text, features, more = decode(body, headers[HEADER_LENGTH]).inputs
    assert deserialize_bytes(text.data) == [b"a"]
    np.testing.assert_array_equal(features.array(), FEATURES)
    assert deserialize_bytes(more.data) == [b"h\xc3\xa9llo", b"\x00\xff"]


@pytest.mark.parametrize(("header_length", "problem"), [
    ("abc", f"{HEADER_LENGTH} must be a non-negative integer, got 'abc'"),
    ("-1", f"{HEADER_LENGTH} must be a non-negative integer, got '-1'"),
    ("1.5", f"{HEADER_LENGTH} must be a non-negative integer"),
    ("999", f"{HEADER_LENGTH} 999 is past the end of the 2-byte body"),
])
def test_a_bad_header_length_is_named(header_length: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        split_body(b"{}", header_length)


MALFORMED = [
    ([{"binary_data_size": -4}], b"", "input 'features': binary_data_size must be a non-negative"),
    ([{"binary_data_size": "8"}], b"12345678", "binary_data_size must be a non-negative integer"),
    ([{"binary_data_size": 8}], b"1234", "input 'features': binary_data_size 8 runs past the end"),
    ([{"binary_data_size": 4}, {"binary_data_size": 8}], b"12345678",
     "input 'features': binary_data_size 8 runs past the end of the body \\(4 bytes"),
    ([{"binary_data_size": 4}], b"12345678", "4 bytes of binary data left over"),
    ([], b"1234", "4 bytes of binary data left over"),
    ([{"binary_data_size": 8, "data": [1, 2]}], b"12345678",
     "input 'features': both 'data' and binary_data_size are given"),
]


@pytest.mark.parametrize(("parameters", "tail", "problem"), MALFORMED)
def test_malformed_binary_inputs_are_named(
    parameters: list[dict[str, Any]], tail: bytes, problem: str
) -> None:
    inputs = [{"name": "features", "datatype": "FP32", "shape": [1, 2],
               "parameters": {"binary_data_size": p["binary_data_size"]},
               **({"data": p["data"]} if "data" in p else {})} for p in parameters]
    inputs = inputs or [{"name": "features", "datatype": "FP32", "shape": [1], "data": [1]}]
    body, headers = binary_body({"inputs": inputs}, tail)
    with pytest.raises(InvalidInput, match=problem):
        decode(body, headers[HEADER_LENGTH])


def test_binary_data_output_is_not_passed_to_the_model() -> None:
    request = decode(orjson.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
        "parameters": {"binary_data_output": True, "user": "alice"},
    }), None)
    assert request.parameters == {"user": "alice"}


def test_a_requested_outputs_binary_data_overrides_the_request_default() -> None:
    fmt = output_format({"parameters": {"binary_data_output": True},
                         "outputs": [{"name": "a", "parameters": {"binary_data": False}},
                                     {"name": "b"}]})
    assert (fmt.is_binary("a"), fmt.is_binary("b"), fmt.is_binary("c")) == (False, True, True)
    assert not output_format({}).is_binary("a")
    with pytest.raises(InvalidInput, match="output 'a': 'binary_data' must be a boolean"):
        output_format({"outputs": [{"name": "a", "parameters": {"binary_data": "yes"}}]})


def test_binary_outputs_follow_the_json_header() -> None:
    response = InferResponse("m", "1", "req", [
        Tensor.from_array("probs", FEATURES), Tensor("label", "BYTES", (2,), TEXT),
    ])
    body, header_length = encode_infer_parts(response, OutputFormat(True, {"label": False}))
    assert header_length is not None
    header = orjson.loads(body[:header_length])
    assert header["outputs"] == [
        {"name": "probs", "datatype": "FP32", "shape": [1, 2],
         "parameters": {"binary_data_size": 8}},
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["héllo", "00ff"]},
    ]
    assert body[header_length:] == FEATURES.tobytes()
    json_body, no_header = encode_infer_parts(response, OutputFormat())
    assert no_header is None
    assert [o["data"] for o in orjson.loads(json_body)["outputs"]] == [[1.5, -2.0],
                                                                       ["héllo", "00ff"]]


# --- through the app ---------------------------------------------------------------------------

@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(echo_gateway(EchoRouter()), max_body_bytes=64 << 10)
    async with TestClient(TestServer(app), auto_decompress=False) as test_client:
        yield test_client


async def post(client: TestClient[Any, Any], model: str, body: bytes,
               headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    return await client.post(f"/v2/models/{model}/infer", data=body,
                             headers={"Accept-Encoding": "identity", **(headers or {})})


async def read_binary(response: aiohttp.ClientResponse) -> tuple[dict[str, Any], bytes]:
    raw = await response.read()
    if response.headers.get("Content-Encoding") == "gzip":
        raw = gzip.decompress(raw)
    length = int(response.headers[HEADER_LENGTH])
    return orjson.loads(raw[:length]), raw[length:]


async def test_a_binary_request_gets_a_json_response(client: TestClient[Any, Any]) -> None:
    body, headers = binary_body(
        {"inputs": [binary_input("features", "FP32", [1, 2], 8)]}, FEATURES.tobytes()
    )
    response = await post(client, "echo", body, headers)
    assert response.status == 200, await response.text()
    assert HEADER_LENGTH not in response.headers
    assert response.content_type == "application/json"
    assert (await response.json())["outputs"][0]["data"] == [1.5, -2.0]


async def test_a_json_request_can_ask_for_binary_outputs(client: TestClient[Any, Any]) -> None:
    request = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                           "data": [1.5, -2.0]}],
               "outputs": [{"name": "features_echo", "parameters": {"binary_data": True}}]}
    response = await post(client, "echo", orjson.dumps(request))
    assert response.status == 200, await response.text()
    assert response.content_type == "application/octet-stream"
    header, tail = await read_binary(response)
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert "data" not in header["outputs"][0]
    assert tail == FEATURES.tobytes()


async def test_mixed_binary_and_json_with_bytes_tensors(client: TestClient[Any, Any]) -> None:
    body, headers = binary_body({
        "inputs": [binary_input("text", "BYTES", [2], len(TEXT)),
                   {"name": "features", "datatype": "FP32", "shape": [2, 2],
                    "data": [1.5, -2, 3, 4]}],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "text_echo"},
                    {"name": "features_echo", "parameters": {"binary_data": False}}],
    }, TEXT)
    response = await post(client, "pair", body, headers)
    assert response.status == 200, await response.text()
    header, tail = await read_binary(response)
    text, features = header["outputs"]
    assert text["parameters"] == {"binary_data_size": len(TEXT)} and tail == TEXT
    assert features["data"] == [1.5, -2.0, 3.0, 4.0]


async def test_bytes_in_json_come_back_as_json(client: TestClient[Any, Any]) -> None:
    request = {"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["héllo", "w"]},
        {"name": "features", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]},
    ]}
    response = await post(client, "pair", orjson.dumps(request))
    assert response.status == 200, await response.text()
    outputs = {o["name"]: o for o in (await response.json())["outputs"]}
    assert outputs["text_echo"]["data"] == ["héllo", "w"]


@pytest.mark.parametrize(("header_length", "inputs", "tail", "problem"), [
    ("9999", [binary_input("features", "FP32", [1, 2], 8)], b"", "is past the end"),
    ("-3", [binary_input("features", "FP32", [1, 2], 8)], b"", "non-negative integer"),
    ("x", [binary_input("features", "FP32", [1, 2], 8)], b"", "non-negative integer"),
    (None, [binary_input("features", "FP32", [1, 2], -8)], b"", "binary_data_size must be"),
    (None, [binary_input("features", "FP32", [1, 2], 16)], b"12345678", "runs past the end"),
    (None, [binary_input("features", "FP32", [1, 2], 4)], b"12345678", "left over"),
    (None, [binary_input("features", "FP32", [1, 4], 8)], b"12345678",
     "input 'features': 8 bytes of data for shape \\[1, 4\\] and datatype FP32 \\(16 expected"),
    (None, [binary_input("features", "FP32", [1, 2], 8) | {"data": [1, 2]}], b"12345678",
     "both 'data' and binary_data_size"),
])
async def test_malformed_binary_requests_are_400_naming_the_problem(
    client: TestClient[Any, Any], header_length: str | None, inputs: list[dict[str, Any]],
    tail: bytes, problem: str,
) -> None:
    body, headers = binary_body({"inputs": inputs}, tail)
    if header_length is not None:
        headers[HEADER_LENGTH] = header_length
    response = await post(client, "echo", body, headers)
    assert response.status == 400
    assert re.search(problem, (await response.json())["error"])


async def test_truncated_bytes_elements_are_400(client: TestClient[Any, Any]) -> None:
    body, headers = binary_body({"inputs": [
        binary_input("text", "BYTES", [1], 6),
        {"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
    ]}, b"\x09\x00\x00\x00ab")
    response = await post(client, "pair", body, headers)
    assert response.status == 400
    assert "input 'text'" in (await response.json())["error"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_request_bodies_are_served(
    client: TestClient[Any, Any], encoding: str
) -> None:
    body, headers = binary_body(
        {"inputs": [binary_input("features", "FP32", [1, 2], 8)]}, FEATURES.tobytes()
    )
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    response = await post(client, "echo", packed, {**headers, "Content-Encoding": encoding})
    assert response.status == 200, await response.text()
    assert (await response.json())["outputs"][0]["data"] == [1.5, -2.0]


async def test_a_decompression_bomb_is_413_naming_the_limit(
    client: TestClient[Any, Any],
) -> None:
    bomb = gzip.compress(b'{"inputs": [' + b" " * (16 << 20) + b"]}")
    assert len(bomb) < 64 << 10
    response = await post(client, "echo", bomb, {"Content-Encoding": "gzip"})
    assert response.status == 413
    assert str(64 << 10) in (await response.json())["error"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_client_accepting_compression_gets_a_compressed_response(
    client: TestClient[Any, Any], encoding: str
) -> None:
    request = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                           "data": [1.5, -2.0]}],
               "parameters": {"binary_data_output": True}}
    response = await post(client, "echo", orjson.dumps(request), {"Accept-Encoding": encoding})
    assert response.status == 200
    assert response.headers["Content-Encoding"] == encoding
    raw = await response.read()
    plain = gzip.decompress(raw) if encoding == "gzip" else zlib.decompress(raw)
    length = int(response.headers[HEADER_LENGTH])  # of the uncompressed JSON header
    assert orjson.loads(plain[:length])["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert plain[length:] == FEATURES.tobytes()


async def test_without_accept_encoding_the_response_is_not_compressed(
    client: TestClient[Any, Any],
) -> None:
    request = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2],
                           "data": [1, 2]}]}
    response = await post(client, "echo", orjson.dumps(request))
    assert response.status == 200
    assert "Content-Encoding" not in response.headers
    assert (await response.json())["outputs"][0]["data"] == [1.0, 2.0]
