"""`infermesh models batching`: a version's queue policy changed through the registry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from cli.main import main
from tests.registry.harness import RegistryHarness


async def _register(url: str, tmp_path: Path) -> None:
    artifact = tmp_path / "model.pt"
    artifact.write_bytes(b"weights" * 100)
    assert await asyncio.to_thread(main, [
        "models", "register", "iris", "--version", "1", "--artifact", str(artifact),
        "--input", "x:FP32:-1,4", "--output", "y:FP32:-1,2", "--max-batch-size", "16",
        "--registry", url,
    ]) == 0


async def test_models_batching_changes_only_the_fields_given(
    registry_url: tuple[str, RegistryHarness], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, harness = registry_url
    await _register(url, tmp_path)
    capsys.readouterr()
    code = await asyncio.to_thread(main, [
        "models", "batching", "iris", "1", "--max-batch-size", "8", "--preferred", "4,8",
        "--default-timeout-ms", "250", "--admission", "off", "--registry", url,
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "max batch size      8" in out and "preferred sizes     4,8" in out
    assert "default timeout     250 ms" in out and "admission           off" in out
    published = (await harness.etcd_json("models/iris/1"))["batching"]
    assert published == {
        "max_batch_size": 8, "max_queue_delay_ms": 2.0, "max_queue_size": 4096,
        "preferred_batch_sizes": [4, 8], "default_timeout_ms": 250.0, "admission": "off",
        "batchers": 1, "edge_inflight": None,
    }
    code = await asyncio.to_thread(main, [
        "models", "batching", "iris", "1", "--default-timeout-ms", "none",
        "--max-queue-delay-ms", "5", "--max-queue-size", "64", "--edge-inflight", "48",
        "--json", "--registry", url,
    ])
    assert code == 0
    record = orjson.loads(capsys.readouterr().out)
    assert record == await harness.etcd_json("models/iris/1")
    assert record["batching"]["default_timeout_ms"] is None
    assert record["batching"]["max_queue_size"] == 64
    assert record["batching"]["edge_inflight"] == 48
    code = await asyncio.to_thread(main, [
        "models", "batching", "iris", "1", "--edge-inflight", "default", "--registry", url,
    ])
    assert code == 0 and "edge in flight      the edge default" in capsys.readouterr().out
    assert (await harness.etcd_json("models/iris/1"))["batching"]["edge_inflight"] is None
    assert record["batching"]["max_batch_size"] == 8


async def test_a_refused_change_is_one_line_exit_1(
    registry_url: tuple[str, RegistryHarness], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = registry_url
    await _register(url, tmp_path)
    capsys.readouterr()
    code = await asyncio.to_thread(main, [
        "models", "batching", "iris", "1", "--preferred", "32", "--registry", url,
    ])
    assert code == 1
    err = capsys.readouterr().err
    assert err == ("infermesh: error: batching: 'preferred_batch_sizes' must lie within "
                   "1..max_batch_size\n")


def test_no_field_or_a_bad_flag_is_usage_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "batching", "iris", "1"]) == 2
    assert "name at least one field" in capsys.readouterr().err
    assert main(["models", "batching", "iris", "1", "--preferred", "4,x"]) == 2
    assert "argument --preferred" in capsys.readouterr().err
    assert main(["models", "batching", "iris", "1", "--admission", "maybe"]) == 2
