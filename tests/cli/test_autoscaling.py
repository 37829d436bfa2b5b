"""`infermesh models autoscaling`: a version's autoscaling block set through the registry."""

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
        "--input", "x:FP32:-1,4", "--output", "y:FP32:-1,2", "--registry", url,
    ]) == 0


async def test_models_autoscaling_opts_in_and_merges_changes(
    registry_url: tuple[str, RegistryHarness], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, harness = registry_url
    await _register(url, tmp_path)
    capsys.readouterr()
    assert await asyncio.to_thread(main, [
        "models", "autoscaling", "iris", "1", "--min", "1", "--max", "3",
        "--target-wait", "0.1", "--registry", url,
    ]) == 0
    assert "max_replicas        3" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [
        "models", "autoscaling", "iris", "1", "--scale-to-zero", "--min", "0",
        "--set", '{"target_wait": null, "idle_to_zero": 30}', "--json", "--registry", url,
    ]) == 0
    record = orjson.loads(capsys.readouterr().out)
    assert record == await harness.etcd_json("models/iris/1")
    assert record["autoscaling"] == {"min_replicas": 0, "max_replicas": 3,
                                     "scale_to_zero": True, "idle_to_zero": 30}
    assert record["replicas"] == {"min": 0, "max": 3}
    assert await asyncio.to_thread(main, [
        "models", "autoscaling", "iris", "1", "--min", "0", "--no-scale-to-zero",
        "--registry", url,
    ]) == 1
    assert "autoscaling.scale_to_zero is true" in capsys.readouterr().err
