"""Ceiling: the demo model called in-process at a fixed batch size in a tight loop.

python -m bench.inprocess --model encoder --batch 32 --duration 10 [--backend onnx]

``--backend onnx`` runs the demo model exported to ONNX (made once, next to the TorchScript
file) in an ONNX Runtime session with the worker's serving options and as many intra-op
threads as torch uses, so the two backends compare on equal terms.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from time import perf_counter

import torch

from bench.models import DEFAULT_CACHE_DIR, load_model
from bench.payloads import input_array


def measure_inprocess(
    model: str,
    batch: int,
    duration: float,
    *,
    warmup: float = 1.0,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    artifact: Path | None = None,
    backend: str = "torchscript",
) -> float:
    """Return rows/s of ``model``'s forward pass on one fixed ``batch``-row input."""
    if backend == "onnx":
        call = _onnx_call(model, batch, cache_dir)
        _forward_for(call, warmup)
        calls, elapsed = _forward_for(call, duration)
        return calls * batch / elapsed
    loaded = load_model(model, cache_dir=cache_dir, artifact=artifact)
    features = torch.from_numpy(input_array(model, batch))
    with torch.inference_mode():
        _forward_for(lambda: loaded.module(features), warmup)
        calls, elapsed = _forward_for(lambda: loaded.module(features), duration)
    return calls * batch / elapsed


def _onnx_call(model: str, batch: int, cache_dir: Path) -> Callable[[], object]:
    """One ``batch``-row call of the demo model's ONNX export in a serving session."""
    import onnxruntime as ort

    from services.mesh.domain.types import Signature
    from services.worker.backends.onnx import CPU_PROVIDER, serving_options
    from services.worker.demo_models import build_demo_models
    from services.worker.onnx_export import convert_torchscript

    cache_dir.mkdir(parents=True, exist_ok=True)
    demo = next(d for d in build_demo_models(cache_dir) if d.name == model)
    onnx_file = demo.artifact.with_suffix(".onnx")
    if not onnx_file.exists() or onnx_file.stat().st_mtime < demo.artifact.stat().st_mtime:
        convert_torchscript(demo.artifact, Signature.from_json(demo.signature), onnx_file)
    session = ort.InferenceSession(str(onnx_file), providers=[CPU_PROVIDER],
                                   sess_options=serving_options(torch.get_num_threads()))
    feed = {demo.signature["inputs"][0]["name"]: input_array(model, batch)}
    return lambda: session.run(None, feed)


def _forward_for(call: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Call ``call`` back to back for ``seconds``; return calls made and time taken."""
    start = perf_counter()
    deadline = start + seconds
    calls = 0
    while True:
        call()
        calls += 1
        now = perf_counter()
        if now >= deadline:
            return calls, now - start


def main(argv: list[str] | None = None) -> None:
    """Print rows/s for one model and batch size."""
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__)
    parser.add_argument("--model", default="encoder", help="demo model name (mlp, encoder)")
    parser.add_argument("--batch", type=int, default=32, help="rows per forward call")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--artifact", type=Path, help="TorchScript file instead of the demo one")
    parser.add_argument("--backend", choices=("torchscript", "onnx"), default="torchscript",
                        help="TorchScript, or ONNX Runtime on the demo model's ONNX export")
    args = parser.parse_args(argv)
    rows_per_s = measure_inprocess(
        args.model,
        args.batch,
        args.duration,
        warmup=args.warmup,
        cache_dir=args.cache_dir,
        artifact=args.artifact,
        backend=args.backend,
    )
    print(
        f"inprocess {args.backend} {args.model} batch={args.batch}: {rows_per_s:.0f} rows/s "
        f"(torch threads {torch.get_num_threads()})"
    )


if __name__ == "__main__":
    main()
