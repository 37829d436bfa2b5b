"""`infermesh models convert`: a TorchScript version exported to ONNX and registered."""

from __future__ import annotations

import asyncio

import pytest

from cli.main import main
from services.worker.demo_models import DemoModel, build_demo_models
from tests.registry.harness import RegistryHarness

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    models = build_demo_models(tmp_path_factory.mktemp("demo"))
    return next(model for model in models if model.name == "mlp")


async def test_a_torchscript_version_becomes_an_onnx_version(
    registry_url: tuple[str, RegistryHarness], mlp: DemoModel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, harness = registry_url
    assert await asyncio.to_thread(main, [
        "models", "register", "mlp", "--version", "1", "--artifact", str(mlp.artifact),
        "--input", "features:FP32:-1,32", "--output", "probs:FP32:-1,2", "--cpu-fallback",
        "--registry", url,
    ]) == 0
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["models", "convert", "mlp", "1", "--registry", url]) == 0
    out = capsys.readouterr().out
    assert "registered mlp version 1-onnx (onnxruntime_onnx) from version 1" in out
    assert "max abs error" in out
    source = await harness.etcd_json("models/mlp/1")
    converted = await harness.etcd_json("models/mlp/1-onnx")
    assert converted["platform"] == "onnxruntime_onnx" and converted["sha256"] != source["sha256"]
    assert converted["signature"] == source["signature"]
    assert converted["cpu_fallback"] is source["cpu_fallback"] is True
    assert await asyncio.to_thread(main, ["models", "convert", "mlp", "7", "--registry", url]) == 1
    assert "model mlp has no version 7" in capsys.readouterr().err
