"""Extra versions of the demo mlp for rollout tests: one with other weights, one that fails.

Both keep the mlp's signature (`features` [N, 32] FP32 -> `probs` [N, 2]), so they register as
new versions of `mlp`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from services.worker.demo_models import MlpClassifier, initialise_weights


class FailingMlp(nn.Module):
    """Warms up fine (the worker warms up on zeros) and fails on every real request."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if bool(features.abs().sum() > 0):
            raise RuntimeError("this canary fails on purpose")
        return torch.full((features.shape[0], 2), 0.5)


def build_mlp_variant(path: Path, *, seed: int) -> Path:
    """The demo mlp with weights from another seed (its outputs differ from version 1's)."""
    module = MlpClassifier()
    initialise_weights(module, seed)
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def build_failing_mlp(path: Path) -> Path:
    torch.jit.save(torch.jit.script(FailingMlp().eval()), str(path))
    return path
