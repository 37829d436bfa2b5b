"""The demo models: deterministic, well-shaped, and batch-independent through the backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.worker.backends.torchscript import TorchScriptBackend
from services.worker.demo_models import DemoModel, build_demo_models

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def second_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoModel]:
    """A second, independent build of every demo model."""
    outdir = tmp_path_factory.mktemp("second_build")
    return {model.name: model for model in build_demo_models(outdir)}


def _backend(model: DemoModel) -> TorchScriptBackend:
    backend = TorchScriptBackend(model.signature, device_policy="cpu")
    backend.load(model.artifact)
    return backend


def _weights(artifact: Path) -> dict[str, torch.Tensor]:
    module = torch.jit.load(str(artifact))  # type: ignore[no-untyped-call]
    return dict(module.state_dict())


def _inputs(name: str, rows: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "mlp":
        return {"features": rng.standard_normal((rows, 32), dtype=np.float32)}
    return {"input_ids": rng.integers(0, 30_522, size=(rows, 64), dtype=np.int64)}


@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_two_builds_have_identical_weights(
    name: str, demo_models: dict[str, DemoModel], second_build: dict[str, DemoModel]
) -> None:
    first = _weights(demo_models[name].artifact)
    second = _weights(second_build[name].artifact)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_rebuild_keeps_current_files_and_replaces_changed_ones(
    second_build: dict[str, DemoModel],
) -> None:
    mlp, encoder = second_build["mlp"].artifact, second_build["encoder"].artifact
    encoder_mtime = encoder.stat().st_mtime_ns
    mlp.write_bytes(b"corrupted")
    rebuilt = {model.name: model for model in build_demo_models(mlp.parent)}
    assert encoder.stat().st_mtime_ns == encoder_mtime
    out = _backend(rebuilt["mlp"]).run_batch(_inputs("mlp", 4))
    assert out["probs"].shape == (4, 2)


def test_signature_files_match_the_models(demo_models: dict[str, DemoModel]) -> None:
    for model in demo_models.values():
        on_disk = json.loads(
            Path(model.artifact.parent, f"{model.name}.signature.json").read_text()
        )
        assert on_disk == model.signature
        assert (model.version, model.device) == ("1", "auto")
    assert demo_models["mlp"].batching == {
        "max_batch_size": 64, "max_queue_delay_ms": 2, "edge_inflight": 64}
    assert demo_models["encoder"].batching == {"max_batch_size": 32, "max_queue_delay_ms": 5}


def test_mlp_returns_probabilities(demo_models: dict[str, DemoModel]) -> None:
    probs = _backend(demo_models["mlp"]).run_batch(_inputs("mlp", 16))["probs"]
    assert probs.shape == (16, 2) and probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-6)


def test_encoder_returns_one_embedding_per_row(demo_models: dict[str, DemoModel]) -> None:
    embedding = _backend(demo_models["encoder"]).run_batch(_inputs("encoder", 3))["embedding"]
    assert embedding.shape == (3, 384) and embedding.dtype == np.float32
    assert np.all(np.isfinite(embedding))
    assert not np.allclose(embedding[0], embedding[1])


@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_row_alone_matches_row_in_batch_of_32(name: str, demo_models: dict[str, DemoModel]) -> None:
    backend = _backend(demo_models[name])
    inputs = _inputs(name, 32)
    (output_name,) = (spec["name"] for spec in demo_models[name].signature["outputs"])
    batched = backend.run_batch(inputs)[output_name]
    alone = np.concatenate(
        [
            backend.run_batch({k: v[i : i + 1] for k, v in inputs.items()})[output_name]
            for i in range(32)
        ]
    )
    assert torch.allclose(torch.from_numpy(batched), torch.from_numpy(alone), rtol=0, atol=1e-5)
    # The tolerance the mesh tests use when comparing served rows with in-process calls.
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)
