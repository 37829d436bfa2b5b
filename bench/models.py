"""Load a demo TorchScript model for the baselines (plain server, in-process loop).

The artifacts come from ``services.worker.demo_models.build_demo_models``, imported lazily so
the rest of ``bench`` imports without it. ``artifact=`` loads any TorchScript file instead,
which is how the benchmarks are tested before the demo models exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.payloads import payload_spec

DEFAULT_CACHE_DIR = Path(".infermesh/bench-models")


@dataclass(frozen=True)
class LoadedModel:
    """A TorchScript module ready for inference, with its OIP tensor names."""

    name: str
    module: torch.jit.ScriptModule
    input_name: str
    output_name: str


def demo_artifact(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[Path, str, str]:
    """Build (or reuse) the demo models in ``cache_dir``; return ``name``'s artifact and names."""
    from services.worker.demo_models import build_demo_models

    cache_dir.mkdir(parents=True, exist_ok=True)
    for demo in build_demo_models(cache_dir):
        if demo.name == name:
            signature = demo.signature
            return demo.artifact, signature["inputs"][0]["name"], signature["outputs"][0]["name"]
    raise ValueError(f"build_demo_models has no model named {name!r}")


def load_model(
    name: str, *, cache_dir: Path = DEFAULT_CACHE_DIR, artifact: Path | None = None
) -> LoadedModel:
    """Load demo model ``name`` on CPU in eval mode (from ``artifact`` if one is given)."""
    if artifact is None:
        artifact, input_name, output_name = demo_artifact(name, cache_dir)
    else:
        spec = payload_spec(name)
        input_name, output_name = spec.input.name, spec.output.name
    module = torch.jit.load(str(artifact), map_location="cpu")  # type: ignore[no-untyped-call]
    module.eval()
    return LoadedModel(name, module, input_name, output_name)
