"""`scripts/cuda_check.py` as a GPU box runs it: here, with no GPU, it checks TorchScript on CPU
and says which CUDA paths it skipped and why, exiting 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "scripts" / "cuda_check.py"
RUN_TIMEOUT_S = 300.0
"""Building the mlp and a 3-second timing loop take ~10 s idle; a busy 2-core host, longer."""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU box runs the real checks")
def test_without_a_gpu_it_exits_0_naming_what_it_skipped(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "out"), "--model", "mlp"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
        cwd=SCRIPT.parents[1],
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "cuda available: False" in lines[0]
    assert any(line.startswith("torchscript mlp on cpu: max |served - cpu| ") for line in lines)
    assert "onnx: skipped (no CUDA device)" in lines
    assert "triton: skipped (no CUDA device)" in lines
    assert not any(line.startswith("FAILED") for line in lines)


def test_a_bad_model_name_is_a_usage_error_naming_the_flag(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "out"), "--model", "resnet"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
        cwd=SCRIPT.parents[1],
    )
    assert done.returncode == 2 and "argument --model" in done.stderr
    assert "Traceback" not in done.stderr
