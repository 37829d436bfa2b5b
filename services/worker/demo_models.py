"""Deterministic demo models for the mesh: built locally from a fixed seed, no downloads.

``python -m services.worker.demo_models OUTDIR`` writes ``mlp.pt`` and ``encoder.pt``
(TorchScript, both made with ``torch.jit.script``; ``torch.jit.trace`` is only a fallback),
a ``<name>.signature.json`` for each, and a ``demo_models.manifest.json`` whose hashes let a
rebuild skip files that are already right and redo ones changed since. Weights depend only on
the seed, so every build on every host gives the same outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_log = logging.getLogger(__name__)

SEED = 0
MANIFEST_NAME = "demo_models.manifest.json"
# Bump when a recipe below changes, so old artifacts are rebuilt.
_RECIPE_VERSION = 1
_VOCAB_SIZE = 30_522
_SEQUENCE_LENGTH = 64


@dataclass(frozen=True)
class DemoModel:
    """A built demo model: where its artifact is and how the mesh should serve it."""

    name: str
    version: str
    artifact: Path
    signature: dict[str, Any]
    batching: dict[str, Any]
    device: str = "auto"


class MlpClassifier(nn.Module):
    """``features`` [N, 32] FP32 -> ``probs`` [N, 2]: a 3-layer ReLU MLP with softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities, one row per input row."""
        return torch.softmax(self.layers(features), dim=-1)


class TextEncoder(nn.Module):
    """``input_ids`` [N, 64] INT64 -> ``embedding`` [N, 384]: a small BERT-sized encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(_VOCAB_SIZE, 384)
        self.positions = nn.Embedding(_SEQUENCE_LENGTH, 384)
        layer = nn.TransformerEncoderLayer(
            384, 12, dim_feedforward=1536, dropout=0.0, activation="gelu", batch_first=True
        )
        # Nested tensors make results depend on padding and batch composition; keep them off.
        self.encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean of the final hidden states over the token positions."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.tokens(input_ids) + self.positions(positions)
        encoded: torch.Tensor = self.encoder(hidden)
        return encoded.mean(dim=1)


@dataclass(frozen=True)
class _Recipe:
    name: str
    factory: Callable[[], nn.Module]
    signature: dict[str, Any]
    batching: dict[str, Any]
    example: Callable[[], torch.Tensor]


def _tensor(name: str, datatype: str, width: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [-1, width]}


_RECIPES = (
    _Recipe(
        "mlp",
        MlpClassifier,
        {"inputs": [_tensor("features", "FP32", 32)], "outputs": [_tensor("probs", "FP32", 2)]},
        # 64 in flight at the edge: ~30 ms of the mlp's work on two cores, within its tight
        # class's 50 ms; 128 let bursts wait at the gateway (docs/PERFORMANCE.md).
        {"max_batch_size": 64, "max_queue_delay_ms": 2, "edge_inflight": 64},
        lambda: torch.zeros(2, 32),
    ),
    _Recipe(
        "encoder",
        TextEncoder,
        {
            "inputs": [_tensor("input_ids", "INT64", _SEQUENCE_LENGTH)],
            "outputs": [_tensor("embedding", "FP32", 384)],
        },
        {"max_batch_size": 32, "max_queue_delay_ms": 5},
        lambda: torch.zeros(2, _SEQUENCE_LENGTH, dtype=torch.int64),
    ),
)


def build_demo_models(outdir: Path) -> list[DemoModel]:
    """Build (or reuse, when the manifest says they are current) every demo model in outdir."""
    outdir.mkdir(parents=True, exist_ok=True)
    manifest_path = outdir / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    models = []
    for recipe in _RECIPES:
        if not _is_current(outdir, recipe, manifest.get(recipe.name)):
            manifest[recipe.name] = _build(outdir, recipe)
        models.append(_demo_model(outdir, recipe))
    _write_atomically(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return models


def initialise_weights(module: nn.Module, seed: int = SEED) -> None:
    """Overwrite every parameter from a local generator, so weights depend only on ``seed``.

    Matrices get the PyTorch default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; LayerNorm keeps
    its ones/zeros; other vectors (biases) get ``U(-0.02, 0.02)``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".norm" in name:
                continue
            bound = 1 / math.sqrt(param.shape[1]) if param.dim() >= 2 else 0.02
            param.uniform_(-bound, bound, generator=generator)


def _build(outdir: Path, recipe: _Recipe) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        module = recipe.factory()
    initialise_weights(module)
    scripted = _to_torchscript(module.eval(), recipe.example())
    artifact = outdir / f"{recipe.name}.pt"
    # Staged under its final name because torch.jit.save names the zip's root folder after the
    # file. Bytes still differ per build (a random serialization id), weights do not.
    with tempfile.TemporaryDirectory(dir=outdir) as staging:
        staged = Path(staging) / artifact.name
        torch.jit.save(scripted, str(staged))
        os.replace(staged, artifact)
    _write_atomically(_signature_path(outdir, recipe), _signature_bytes(recipe))
    _log.info("built %s -> %s", recipe.name, artifact)
    return {"recipe": _RECIPE_VERSION, "artifact": artifact.name, "sha256": _sha256(artifact)}


def _to_torchscript(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    try:
        scripted: torch.jit.ScriptModule = torch.jit.script(module)
    except (RuntimeError, torch.jit.frontend.NotSupportedError):
        # Not reached for today's recipes; tracing is a safe fallback for shape-static models.
        with torch.no_grad():
            scripted = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
    return scripted


def _is_current(outdir: Path, recipe: _Recipe, entry: Any) -> bool:
    artifact = outdir / f"{recipe.name}.pt"
    signature = _signature_path(outdir, recipe)
    return (
        isinstance(entry, dict)
        and entry.get("recipe") == _RECIPE_VERSION
        and artifact.is_file()
        and signature.is_file()
        and signature.read_bytes() == _signature_bytes(recipe)
        and entry.get("sha256") == _sha256(artifact)
    )


def _demo_model(outdir: Path, recipe: _Recipe) -> DemoModel:
    return DemoModel(
        name=recipe.name,
        version="1",
        artifact=outdir / f"{recipe.name}.pt",
        signature=json.loads(_signature_bytes(recipe)),
        batching=dict(recipe.batching),
    )


def _signature_path(outdir: Path, recipe: _Recipe) -> Path:
    return outdir / f"{recipe.name}.signature.json"


def _signature_bytes(recipe: _Recipe) -> bytes:
    return json.dumps(recipe.signature, indent=2, sort_keys=True).encode() + b"\n"


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_atomically(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    """Build the demo models into ``argv[0]`` and print what is there."""
    if len(argv) != 1:
        print("usage: python -m services.worker.demo_models OUTDIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for model in build_demo_models(Path(argv[0])):
        size_mb = model.artifact.stat().st_size / 1e6
        print(f"{model.name} v{model.version}: {model.artifact} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
