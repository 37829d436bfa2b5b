from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from cli.main import main
from deploy.localdeps import free_port
from services.mesh.infra.credentials import MeshCredential
from services.mesh.transport.auth import bearer
from tests.registry.harness import RegistryHarness

TOKEN = "s3cret"


@pytest.fixture
async def control_url(
    registry_url: tuple[str, RegistryHarness], mesh_credential: MeshCredential,
) -> AsyncIterator[str]:
    """A stand-in for the control API's model endpoints, behind its bearer token: they answer
    exactly the JSON of the registry's, so this one forwards to a real registry (an internal
    surface: it presents the mesh credential)."""
    async def forward(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "missing or unknown bearer token"}, status=401)
        async with session.get(registry_url[0] + request.path_qs,
                               headers=bearer(mesh_credential)) as reply:
            return web.Response(body=await reply.read(), status=reply.status,
                                content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/models", forward)
    app.router.add_get("/v1/models/{model}", forward)
    runner = web.AppRunner(app)
    async with aiohttp.ClientSession() as session:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not really torchscript" * 10_000)
    return path


async def test_models_register_list_show(
    registry_url: tuple[str, RegistryHarness], control_url: str, artifact: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, harness = registry_url
    control = ["--control", control_url, "--token", TOKEN]
    code = await asyncio.to_thread(main, [
        "models", "register", "iris", "--version", "1", "--artifact", str(artifact),
        "--input", "x:fp32:-1,4", "--output", "y:FP32:-1,2", "--max-batch-size", "16",
        "--device", "cpu", "--registry", url,
    ])
    assert code == 0
    assert "registered iris version 1" in capsys.readouterr().out
    record = await harness.etcd_json("models/iris/1")
    assert record["signature"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert record["batching"]["max_batch_size"] == 16 and record["device"] == "cpu"

    assert await asyncio.to_thread(main, ["models", "list", *control]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "VERSIONS", "LATEST", "SERVING", "DESCRIPTION"]
    assert row.split() == ["iris", "1", "1", "1"]
    for column in ("VERSIONS", "LATEST", "SERVING"):  # aligned: values start under headers
        assert row[header.index(column)] == "1"

    assert await asyncio.to_thread(main, ["models", "show", "iris", *control]) == 0
    shown = capsys.readouterr().out
    assert "x:FP32[-1,4]" in shown and "rollout (epoch 1): 1 100%" in shown
    show_json = ["models", "show", "iris", "--json", *control]
    assert await asyncio.to_thread(main, show_json) == 0
    assert orjson.loads(capsys.readouterr().out)["versions"][0] == record


async def test_control_errors_are_one_line_exit_1(
    control_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    show = ["models", "show", "nope", "--control", control_url]
    assert await asyncio.to_thread(main, [*show, "--token", TOKEN]) == 1
    assert capsys.readouterr().err == "infermesh: error: 404 Not Found: model 'nope' not found\n"

    assert await asyncio.to_thread(main, [*show, "--token", "wrong"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("infermesh: error: 401 Unauthorized: missing or unknown bearer token")


def test_bad_input_spec_exits_2_naming_the_flag(
    artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "models", "register", "iris", "--version", "1", "--artifact", str(artifact),
        "--input", "x:FP32", "--output", "y:FP32:-1,2",
    ])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "argument --input" in err
    assert "Traceback" not in err


def test_unreachable_registry_exits_1(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main([
        "models", "register", "iris", "--version", "1", "--artifact", str(artifact),
        "--input", "x:FP32:4", "--output", "y:FP32:2", "--registry", url,
    ]) == 1
    err = capsys.readouterr().err
    assert err.startswith("infermesh: error: cannot reach the registry") and err.count("\n") == 1


async def test_models_register_sets_the_prediction_log_policy(
    registry_url: tuple[str, RegistryHarness], artifact: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, harness = registry_url
    code = await asyncio.to_thread(main, [
        "models", "register", "iris", "--version", "1", "--artifact", str(artifact),
        "--input", "x:FP32:-1,4", "--output", "y:FP32:-1,2", "--prediction-log", "none",
        "--registry", url,
    ])
    assert code == 0
    assert "logging   none" in capsys.readouterr().out
    assert (await harness.etcd_json("models/iris/1"))["prediction_log"] == "none"
