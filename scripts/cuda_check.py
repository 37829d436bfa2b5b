"""Prove the worker's CUDA paths on a GPU machine: TorchScript, ONNX Runtime and Triton.

    python scripts/cuda_check.py OUTDIR [--model mlp|encoder ...]

- TorchScript: each demo model on device policy ``auto`` lands on CUDA and matches CPU.
- ONNX Runtime: each demo model exported to ONNX (``services.worker.onnx_export``) runs in a
  ``CUDAExecutionProvider`` session (policy ``cuda``, no fallback) and matches TorchScript on CPU.
- Triton: a ``tritonserver`` on PATH serves the mlp's ONNX export on the GPU (``KIND_GPU``) and
  the Triton backend's outputs match TorchScript on CPU.

A path whose hardware or software is missing is skipped with a line saying what is missing, so
on a machine without a GPU the script exits 0 having checked TorchScript on CPU. It exits 1
when a check ran and failed (outputs out of tolerance, a backend error). It needs only torch
and numpy (no etcd, Postgres or aiohttp); onnxruntime and tritonclient only for their paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from services.worker.backends.devices import resolve_device
from services.worker.backends.torchscript import TorchScriptBackend
from services.worker.demo_models import DemoModel, build_demo_models

ATOL = {"mlp": 1e-4, "encoder": 5e-3}
"""Largest |GPU - CPU| allowed per demo model. The mlp's probabilities matched to 6e-8 and the
encoder's embeddings (~0.36 in size) to 2.2e-4 with torch; ONNX Runtime's CUDA provider runs
its matmuls in TF32 (``use_tf32`` defaults to on), whose 10-bit mantissa moves six 384-wide
layers further, so the encoder's bound leaves room for that and nothing like a wrong kernel."""
Arrays = dict[str, npt.NDArray[Any]]


class Runner(Protocol):
    """What a check needs of a backend."""

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Arrays: ...


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, nargs="?", default=Path("/tmp/infermesh-cuda-check"))
    parser.add_argument("--model", action="append", choices=sorted(ATOL),
                        help="demo models to check (default: both)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda available: {cuda}, "
          f"auto resolves to {resolve_device('auto')}")
    demos = [d for d in build_demo_models(args.outdir) if d.name in (args.model or ATOL)]
    failed = [f for demo in demos for f in check_torchscript(demo)]
    failed += check_onnx(demos, args.outdir, cuda=cuda)
    failed += check_triton(demos, args.outdir, cuda=cuda)
    for failure in failed:
        print(f"FAILED {failure}")
    return 1 if failed else 0


def check_torchscript(demo: DemoModel) -> list[str]:
    """Policy ``auto`` against ``cpu``; prints the device, the difference and GPU rows/s."""
    gpu, cpu = _torchscript(demo, "auto"), _torchscript(demo, "cpu")
    inputs = sample_batch(demo)
    failure = compare(f"torchscript {demo.name} on {gpu.device}", demo, gpu, cpu, inputs)
    started, runs = time.perf_counter(), 0
    while time.perf_counter() - started < 3:
        gpu.run_batch(inputs)
        runs += 1
    print(f"  batch 32 on {gpu.device}: {runs * 32 / (time.perf_counter() - started):,.0f} rows/s")
    return [failure] if failure else []


def check_onnx(demos: list[DemoModel], outdir: Path, *, cuda: bool) -> list[str]:
    """Each demo model's ONNX export in a CUDA session against TorchScript on CPU."""
    missing = _missing_onnx_cuda(cuda)
    if missing:
        print(f"onnx: skipped ({missing})")
        return []
    from services.worker.backends.onnx import OnnxBackend

    failed = []
    for demo in demos:
        served = OnnxBackend(demo.signature, device_policy="cuda", cpu_fallback=False)
        served.load(export_onnx(demo, outdir))
        served.warm_up(demo.batching["max_batch_size"])
        reference = _torchscript(demo, "cpu")
        failure = compare(f"onnx {demo.name} on {served.device}", demo, served, reference,
                          sample_batch(demo))
        failed += [failure] if failure else []
    return failed


def check_triton(demos: list[DemoModel], outdir: Path, *, cuda: bool) -> list[str]:
    """The mlp's ONNX export served by a local GPU ``tritonserver``, through the backend."""
    mlp = next((d for d in demos if d.name == "mlp"), None)
    server = shutil.which("tritonserver")
    missing = ("no CUDA device" if not cuda else
               "the mlp is not among the models checked" if mlp is None else
               "no tritonserver on PATH (NGC's nvcr.io/nvidia/tritonserver image has one)"
               if server is None else _missing_onnx_cuda(cuda) or _missing("tritonclient"))
    if missing or mlp is None or server is None:
        print(f"triton: skipped ({missing})")
        return []
    from cuda_triton import served_by_triton  # beside this script: run only on a GPU box

    with served_by_triton(server, export_onnx(mlp, outdir), mlp, outdir / "triton") as served:
        failure = compare("triton mlp on the GPU", mlp, served, _torchscript(mlp, "cpu"),
                          sample_batch(mlp))
    return [failure] if failure else []


def compare(label: str, demo: DemoModel, served: Runner, reference: Runner,
            inputs: Arrays) -> str | None:
    """Print the largest difference of the first output; the failure line when past ATOL."""
    name = demo.signature["outputs"][0]["name"]
    diff = float(np.abs(served.run_batch(inputs)[name] - reference.run_batch(inputs)[name]).max())
    print(f"{label}: max |served - cpu| {diff:.2e} (allowed {ATOL[demo.name]:g})")
    return None if diff <= ATOL[demo.name] else f"{label}: {diff:.2e} > {ATOL[demo.name]:g}"


def sample_batch(demo: DemoModel, rows: int = 32) -> Arrays:
    """A seeded batch of the demo model's one input (token ids or features)."""
    spec = demo.signature["inputs"][0]
    rng = np.random.default_rng(0)
    if spec["datatype"] == "INT64":
        return {spec["name"]: rng.integers(0, 30522, (rows, spec["shape"][1]), dtype=np.int64)}
    return {spec["name"]: rng.standard_normal((rows, spec["shape"][1]), dtype=np.float32)}


def export_onnx(demo: DemoModel, outdir: Path) -> Path:
    """The demo model's ONNX export (made once per OUTDIR)."""
    from services.mesh.domain.types import Signature
    from services.worker.onnx_export import convert_torchscript

    out = outdir / f"{demo.name}.onnx"
    if not out.exists():
        convert_torchscript(demo.artifact, Signature.from_json(demo.signature), out)
    return out


def _torchscript(demo: DemoModel, policy: str) -> TorchScriptBackend:
    backend = TorchScriptBackend(demo.signature, device_policy=policy)
    backend.load(demo.artifact)
    backend.warm_up(demo.batching["max_batch_size"])
    return backend


def _missing_onnx_cuda(cuda: bool) -> str | None:
    if not cuda:
        return "no CUDA device"
    if _missing("onnxruntime"):
        return _missing("onnxruntime")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu has)"
    return None


def _missing(package: str) -> str | None:
    return None if importlib.util.find_spec(package) else f"{package} is not installed"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
