"""Registering `.onnx` artifacts: the signature is read from the model, and what a caller says
of it must agree (a 400 naming the tensor and field otherwise).

Over in-process stores (the reading is the registry's own; Postgres and etcd add nothing) and
once through the REST adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from onnx import TensorProto, helper

from services.mesh.domain.errors import InvalidInput
from services.registry.app import create_app
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry
from services.registry.onnx_signatures import OnnxSignatureReader
from tests.credentials import AUTH, CREDENTIAL
from tests.registry.fakes import MemoryStore
from tests.registry.harness import chunks_of

ONNX = "onnxruntime_onnx"
READ = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]},
               {"name": "mask", "datatype": "INT64", "shape": [-1, 4]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 4]}],
}


def _tiny_model() -> bytes:
    """scores = relu(features) * cast(mask): two inputs, a symbolic batch dim, a weight that
    is also listed among the graph inputs (the old exporters' way), which is not an input."""
    weight = helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["features"], ["r"]),
         helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["r", "m"], ["p"]),
         helper.make_node("Mul", ["p", "scale"], ["scores"])],
        "tiny",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 4]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    serialized: bytes = model.SerializeToString()
    return serialized


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(MemoryStore(), ArtifactStore(tmp_path), public_url="http://registry.test",
                    signatures=OnnxSignatureReader())


async def _upload(registry: Registry, data: bytes | None = None) -> str:
    return (await registry.put_artifact(chunks_of(data or _tiny_model()))).sha256


async def test_a_version_without_a_signature_gets_the_models(registry: Registry) -> None:
    sha = await _upload(registry)
    stored = await registry.register_version("tiny", "1", artifact_sha256=sha, platform=ONNX)
    assert stored.created and stored.value.signature.to_json() == READ
    assert stored.value.platform == ONNX


async def test_a_partial_signature_is_completed_from_the_model(registry: Registry) -> None:
    sha = await _upload(registry)
    given = {"inputs": [{"name": "mask"}, {"name": "features", "shape": [-1, 4]}],
             "outputs": [{"name": "scores", "datatype": "FP32"}]}
    stored = await registry.register_version(
        "tiny", "1", artifact_sha256=sha, platform=ONNX, signature=given
    )
    assert stored.value.signature.to_json() == {
        "inputs": [READ["inputs"][1], READ["inputs"][0]],
        "outputs": READ["outputs"],
    }


@pytest.mark.parametrize(("given", "message"), [
    ({"inputs": [{"name": "features", "datatype": "FP64"}, {"name": "mask"}]},
     "signature input 'features': 'datatype' is FP64, the model's is FP32"),
    ({"outputs": [{"name": "scores", "shape": [-1, 5]}]},
     r"signature output 'scores': 'shape' \[-1, 5\] does not fit the model's \[-1, 4\]"),
    ({"outputs": [{"name": "logits"}]},
     "signature output 'logits': the model has no such output"),
    ({"inputs": [{"name": "features"}]},
     "signature input 'mask': the model needs it"),
])
async def test_a_signature_that_disagrees_with_the_model_is_refused(
    registry: Registry, given: dict[str, Any], message: str
) -> None:
    sha = await _upload(registry)
    with pytest.raises(InvalidInput, match=message):
        await registry.register_version(
            "tiny", "1", artifact_sha256=sha, platform=ONNX, signature=given
        )
    assert await registry.list_models() == []


async def test_a_file_that_is_not_onnx_is_refused(registry: Registry) -> None:
    sha = await _upload(registry, b"not a model at all")
    with pytest.raises(InvalidInput, match="artifact: not a readable ONNX model"):
        await registry.register_version("tiny", "1", artifact_sha256=sha, platform=ONNX)
    with pytest.raises(InvalidInput, match="missing field 'signature'"):
        await registry.register_version(
            "tiny", "1", artifact_sha256=sha, platform="pytorch_torchscript"
        )


async def test_over_http_the_mismatch_is_a_400_naming_the_field(registry: Registry) -> None:
    app: web.Application = create_app(registry, credential=CREDENTIAL)
    async with TestClient(TestServer(app), headers=AUTH) as client:
        upload = await client.put("/v1/artifacts", data=_tiny_model())
        sha = (await upload.json())["sha256"]
        url = "/v1/models/tiny/versions/1"
        bad = {"artifact_sha256": sha, "platform": ONNX,
               "signature": {"inputs": [{"name": "mask", "datatype": "INT32"},
                                        {"name": "features"}]}}
        refused = await client.put(url, json=bad)
        assert refused.status == 400
        assert "signature input 'mask': 'datatype' is INT32" in (await refused.json())["error"]
        created = await client.put(url, json={"artifact_sha256": sha, "platform": ONNX})
        assert created.status == 201
        assert (await created.json())["signature"] == READ
