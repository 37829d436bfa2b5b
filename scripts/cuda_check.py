"""Prove the worker's CUDA path on a GPU machine: demo models on `auto` land on CUDA, match CPU.

    python scripts/cuda_check.py OUTDIR

Needs only torch and numpy (no etcd, Postgres or aiohttp), so it runs on a bare GPU box.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from services.worker.backends.devices import resolve_device
from services.worker.backends.torchscript import TorchScriptBackend
from services.worker.demo_models import build_demo_models


def main(outdir: Path) -> int:
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
          f"auto resolves to {resolve_device('auto')}")
    for demo in build_demo_models(outdir):
        gpu = TorchScriptBackend(demo.signature, device_policy="auto")
        cpu = TorchScriptBackend(demo.signature, device_policy="cpu")
        for backend in (gpu, cpu):
            backend.load(demo.artifact)
            backend.warm_up(demo.batching["max_batch_size"])
        spec = demo.signature["inputs"][0]
        rng = np.random.default_rng(0)
        if spec["datatype"] == "INT64":
            batch = rng.integers(0, 30522, (32, spec["shape"][1]), dtype=np.int64)
        else:
            batch = rng.standard_normal((32, spec["shape"][1]), dtype=np.float32)
        inputs = {spec["name"]: batch}
        on_gpu, on_cpu = gpu.run_batch(inputs), cpu.run_batch(inputs)
        name = demo.signature["outputs"][0]["name"]
        diff = float(np.abs(on_gpu[name] - on_cpu[name]).max())
        started, runs = time.perf_counter(), 0
        while time.perf_counter() - started < 3:
            gpu.run_batch(inputs)
            runs += 1
        rate = runs * 32 / (time.perf_counter() - started)
        print(f"{demo.name}: device {gpu.device}, max |gpu-cpu| {diff:.2e}, "
              f"batch 32 on {gpu.device}: {rate:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/infermesh-cuda-check")))
