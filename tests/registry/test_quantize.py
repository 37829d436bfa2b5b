"""int8 versions: the registry quantizes an ONNX version, measures it against fp32, records it."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from onnx import TensorProto, helper, numpy_helper

from services.registry.app import create_app
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry
from services.registry.quantize import SLOWER, OnnxQuantizer, id_bounds, verdict
from services.registry.store import PostgresEtcdStore
from tests.credentials import AUTH, CREDENTIAL
from tests.registry.harness import SIGNATURE, RegistryHarness

Client = TestClient[web.Request, web.Application]
VOCABULARY = 50
TINY_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, 8]},
               {"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}],
}


def tiny_encoder() -> onnx.ModelProto:
    """`y = (mean of the ids' embeddings + x) @ w + b`: a Gather and a MatMul to quantize."""
    rng = np.random.default_rng(1)
    weights: dict[str, npt.NDArray[Any]] = {
        "table": rng.standard_normal((VOCABULARY, 64)).astype(np.float32),
        "w": (rng.standard_normal((64, 64)) / 8).astype(np.float32),
        "b": np.zeros(64, np.float32), "axes": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Add", ["pooled", "x"], ["mixed"]),
        helper.make_node("MatMul", ["mixed", "w"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 8]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        initializer=[numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.fixture
def onnx_bytes() -> bytes:
    serialized: bytes = tiny_encoder().SerializeToString()
    return serialized


@pytest.fixture
async def client(harness: RegistryHarness, tmp_path: Path) -> AsyncIterator[Client]:
    """The registry API with a quantizer, over the harness's Postgres and etcd."""
    registry = Registry(
        PostgresEtcdStore(harness.pool, harness.etcd, etcd_prefix=harness.prefix),
        ArtifactStore(tmp_path / "artifacts"), public_url="http://registry.test",
        quantizer=OnnxQuantizer(passes=2),
    )
    async with TestClient(TestServer(create_app(registry, credential=CREDENTIAL)),
                          headers=AUTH) as client:
        yield client


async def _register(
    client: Client, artifact: bytes, *, signature: dict[str, Any], **extra: Any
) -> str:
    upload = await client.put("/v1/artifacts", data=artifact)
    assert upload.status == 201
    sha: str = (await upload.json())["sha256"]
    body = {"artifact_sha256": sha, "signature": signature,
            "batching": {"max_batch_size": 16}, **extra}
    assert (await client.put("/v1/models/enc/versions/1", json=body)).status == 201
    return sha


async def test_quantize_registers_a_measured_int8_version(
    client: Client, harness: RegistryHarness, onnx_bytes: bytes
) -> None:
    source_sha = await _register(client, onnx_bytes, signature=TINY_SIGNATURE,
                                 platform="onnxruntime_onnx")
    reply = await client.post("/v1/models/enc/versions/1/quantize",
                              json={"mode": "int8-dynamic"})
    assert reply.status == 201, await reply.text()
    record = await reply.json()
    assert record["version"] == "1-int8" and record["sha256"] != source_sha
    assert record["derived_from"] == {"version": "1", "mode": "int8-dynamic"}
    assert record["platform"] == "onnxruntime_onnx" and record["signature"] == TINY_SIGNATURE
    assert record["batching"]["max_batch_size"] == 16
    artifact = await (await client.get(f"/v1/artifacts/{record['sha256']}")).read()
    assert hashlib.sha256(artifact).hexdigest() == record["sha256"]
    ops = {node.op_type for node in onnx.load_from_string(artifact).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops

    numbers = record["quantization"]
    assert numbers["speedup_b32"] > 0 and numbers["speedup_b1"] > 0
    assert set(numbers["max_abs_error"]) == set(numbers["mean_abs_error"]) == {"y"}
    # Outputs are of order 1: int8 weights are off by a few hundredths, never by the whole.
    assert 0 < numbers["mean_abs_error"]["y"] <= numbers["max_abs_error"]["y"] < 0.5
    assert (numbers["verdict"] == SLOWER) == (numbers["speedup_b32"] < 1.0)
    assert numbers["rows_per_s_b32"]["int8"] > 0 and numbers["measured_at"]

    assert await harness.etcd_json("models/enc/1-int8") == record
    shown = await (await client.get("/v1/models/enc")).json()
    assert [v["version"] for v in shown["versions"]] == ["1", "1-int8"]
    assert shown["versions"][1] == record
    again = await client.post("/v1/models/enc/versions/1/quantize", json={})
    assert again.status == 200 and await again.json() == record  # not measured twice


async def test_a_named_target_and_refusals(client: Client, onnx_bytes: bytes) -> None:
    await _register(client, onnx_bytes, signature=TINY_SIGNATURE, platform="onnxruntime_onnx")
    named = await client.post("/v1/models/enc/versions/1/quantize", json={"version": "fast"})
    assert named.status == 201 and (await named.json())["version"] == "fast"
    twice = await client.post("/v1/models/enc/versions/fast/quantize")
    assert twice.status == 400 and "derived already" in (await twice.json())["error"]
    mode = await client.post("/v1/models/enc/versions/1/quantize", json={"mode": "int4"})
    assert mode.status == 400 and (await mode.json())["error"].startswith("mode:")
    for path in ("/v1/models/enc/versions/9/quantize", "/v1/models/nope/versions/1/quantize"):
        assert (await client.post(path)).status == 404


async def test_a_torchscript_source_is_refused_naming_the_platform(client: Client) -> None:
    await _register(client, b"torchscript weights" * 100, signature=SIGNATURE)
    reply = await client.post("/v1/models/enc/versions/1/quantize", json={})
    assert reply.status == 400
    error = (await reply.json())["error"]
    assert error.startswith("platform:") and "infermesh models convert enc 1" in error


def test_token_ids_stay_below_the_embedding_table() -> None:
    assert id_bounds(tiny_encoder().graph) == {"input_ids": VOCABULARY}


def test_the_numbers_decide() -> None:
    assert verdict(0.8, 1.3) == SLOWER
    assert verdict(1.5, 0.9) == "faster than fp32: 1.50x at batch 32 (slower at 1 row: 0.90x)"
    assert verdict(1.2, 1.1) == "faster than fp32: 1.20x at batch 32"
