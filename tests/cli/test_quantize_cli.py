"""`infermesh models quantize` and the numbers `infermesh models show` prints for it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from cli.main import main
from control.registry_client import RegistryClient
from services.mesh.infra.credentials import MeshCredential
from services.registry.app import create_app
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry
from services.registry.quantize import OnnxQuantizer
from services.registry.store import PostgresEtcdStore
from tests.registry.harness import open_registry
from tests.registry.test_quantize import TINY_SIGNATURE, tiny_encoder


@pytest.fixture
async def quantizing_registry(
    database_url: str, etcd_url: str, etcd_prefix: str, tmp_path: Path,
    mesh_credential: MeshCredential,
) -> AsyncIterator[str]:
    """A registry with a quantizer on a real port, requiring the session's mesh credential."""
    async with open_registry(database_url, etcd_url, etcd_prefix, tmp_path / "artifacts") as h:
        registry = Registry(
            PostgresEtcdStore(h.pool, h.etcd, etcd_prefix=h.prefix),
            ArtifactStore(tmp_path / "artifacts"), public_url="http://registry.test",
            quantizer=OnnxQuantizer(passes=2),
        )
        runner = web.AppRunner(create_app(registry, credential=mesh_credential))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


async def _register(url: str, credential: MeshCredential, tmp_path: Path) -> None:
    """Version 1 of `enc` in ONNX, version `ts` a TorchScript one."""
    onnx_file, torchscript = tmp_path / "enc.onnx", tmp_path / "enc.pt"
    await asyncio.to_thread(onnx_file.write_bytes, tiny_encoder().SerializeToString())
    await asyncio.to_thread(torchscript.write_bytes, b"torchscript weights" * 100)
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(session, url, credential=credential)
        await client.create_model("enc")
        for version, path, platform in (("1", onnx_file, "onnxruntime_onnx"),
                                        ("ts", torchscript, "pytorch_torchscript")):
            uploaded = await client.upload_artifact(path)
            await client.register_version("enc", version, artifact_sha256=uploaded["sha256"],
                                          signature=TINY_SIGNATURE, platform=platform)


async def test_quantize_prints_the_measurement_and_show_repeats_it(
    quantizing_registry: str, mesh_credential: MeshCredential, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = quantizing_registry
    await _register(url, mesh_credential, tmp_path)
    code = await asyncio.to_thread(main, ["models", "quantize", "enc", "1", "--registry", url])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("registered enc version 1-int8\n")
    assert "derived from  version 1 (int8-dynamic)" in out
    assert re.search(r"speed-up      \d+\.\d\dx at batch 32, \d+\.\d\dx at 1 row", out)
    assert re.search(r"max abs error y \d", out) and "verdict       " in out

    # The registry answers GET /v1/models/{model} exactly as the control API does (the same
    # reads): `models show` is pointed at it, with the mesh credential as its bearer token.
    show = ["models", "show", "enc", "--control", url, "--token", mesh_credential.token]
    assert await asyncio.to_thread(main, [*show, "--json"]) == 0
    numbers = orjson.loads(capsys.readouterr().out)["versions"][-1]["quantization"]
    assert await asyncio.to_thread(main, show) == 0
    shown = capsys.readouterr().out
    assert "version 1-int8:" in shown and numbers["verdict"] in shown
    assert f"{numbers['speedup_b32']:.2f}x at batch 32" in shown
    assert f"max abs error y {numbers['max_abs_error']['y']:.3g}" in shown


async def test_a_torchscript_version_is_refused_in_one_line(
    quantizing_registry: str, mesh_credential: MeshCredential, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await _register(quantizing_registry, mesh_credential, tmp_path)
    command = ["models", "quantize", "enc", "ts", "--registry", quantizing_registry]
    assert await asyncio.to_thread(main, command) == 1
    err = capsys.readouterr().err
    assert err.startswith("infermesh: error: platform: version ts of enc is pytorch_torchscript")
    assert "infermesh models convert enc ts" in err and err.count("\n") == 1
