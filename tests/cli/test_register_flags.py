"""`infermesh models register`'s runtime flags: --platform, --device, --cpu-fallback,
--worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import onnx
import pytest
from aiohttp import web
from onnx import TensorProto, helper

from cli.main import main
from deploy.localdeps import free_port
from services.mesh.infra.credentials import MeshCredential
from services.registry.app import create_app
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry
from services.registry.onnx_signatures import OnnxSignatureReader
from services.registry.store import PostgresEtcdStore
from tests.registry.harness import RegistryHarness, open_registry


@pytest.fixture
async def reading_registry(
    database_url: str, etcd_url: str, etcd_prefix: str, tmp_path: Path,
    mesh_credential: MeshCredential,
) -> AsyncIterator[tuple[str, RegistryHarness]]:
    """A registry that reads ONNX signatures (as `python -m services.registry` does), on a real
    port: (base URL, harness for its etcd)."""
    async with open_registry(database_url, etcd_url, etcd_prefix, tmp_path / "artifacts") as h:
        registry = Registry(
            PostgresEtcdStore(h.pool, h.etcd, etcd_prefix=h.prefix),
            ArtifactStore(tmp_path / "artifacts"), public_url="http://registry.test",
            signatures=OnnxSignatureReader(),
        )
        runner = web.AppRunner(create_app(registry, credential=mesh_credential))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}", h
        finally:
            await runner.cleanup()


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    """A one-node ONNX model (y = relu(x), x FP32 [batch, 4]) that declares its signature."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def script_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not really torchscript" * 1_000)
    return path


async def test_an_onnx_file_registers_as_onnx_with_its_own_signature_and_device_policy(
    reading_registry: tuple[str, RegistryHarness], onnx_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, harness = reading_registry
    code = await asyncio.to_thread(main, [
        "models", "register", "relu", "--version", "1", "--artifact", str(onnx_model),
        "--device", "cuda", "--cpu-fallback", "--registry", url,
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "registered relu version 1 (onnxruntime_onnx)" in out
    assert "device    cuda, CPU fallback allowed" in out
    record = await harness.etcd_json("models/relu/1")
    assert record["platform"] == "onnxruntime_onnx"
    assert record["device"] == "cuda" and record["cpu_fallback"] is True
    assert record["signature"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


@pytest.fixture
def unnamed_file(tmp_path: Path) -> Path:
    """An artifact whose extension names no platform."""
    path = tmp_path / "model.bin"
    path.write_bytes(b"torchscript weights" * 1_000)
    return path


async def test_platform_and_no_cpu_fallback_are_sent_as_given(
    registry_url: tuple[str, RegistryHarness], unnamed_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, harness = registry_url
    code = await asyncio.to_thread(main, [
        "models", "register", "iris", "--version", "1", "--artifact", str(unnamed_file),
        "--input", "x:FP32:-1,4", "--output", "y:FP32:-1,2", "--platform", "triton",
        "--device", "cuda", "--no-cpu-fallback", "--worker", "dedicated", "--registry", url,
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "(triton)" in out and "device    cuda\n" in out and "workers   dedicated" in out
    record = await harness.etcd_json("models/iris/1")
    assert record["platform"] == "triton" and record["cpu_fallback"] is False
    assert record["worker"] == "dedicated"


@pytest.mark.parametrize(("flag", "value"), [
    ("--platform", "tensorflow"), ("--device", "gpu"), ("--cpu-fallback=yes", None),
    ("--worker", "own"),
])
def test_a_bad_value_exits_2_naming_the_flag(
    flag: str, value: str | None, script_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "models", "register", "iris", "--version", "1", "--artifact", str(script_file),
        "--input", "x:FP32:-1,4", "--output", "y:FP32:-1,2", flag, *([value] if value else []),
    ])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"argument {flag.split('=')[0]}" in err
    assert "Traceback" not in err


def test_a_torchscript_file_without_a_signature_exits_2_before_any_call(
    script_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a call would exit 1
    code = main([
        "models", "register", "iris", "--version", "1", "--artifact", str(script_file),
        "--output", "y:FP32:-1,2", "--registry", url,
    ])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--input" in err and "required for platform pytorch_torchscript" in err
