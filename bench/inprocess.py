"""Ceiling: the demo model called in-process at a fixed batch size in a tight loop.

python -m bench.inprocess --model encoder --batch 32 --duration 10
"""

from __future__ import annotations

import argparse
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
) -> float:
    """Return rows/s of ``model``'s forward pass on one fixed ``batch``-row input."""
    loaded = load_model(model, cache_dir=cache_dir, artifact=artifact)
    features = torch.from_numpy(input_array(model, batch))
    with torch.inference_mode():
        _forward_for(loaded.module, features, warmup)
        calls, elapsed = _forward_for(loaded.module, features, duration)
    return calls * batch / elapsed


def _forward_for(
    module: torch.jit.ScriptModule, features: torch.Tensor, seconds: float
) -> tuple[int, float]:
    """Call ``module`` back to back for ``seconds``; return calls made and time taken."""
    start = perf_counter()
    deadline = start + seconds
    calls = 0
    while True:
        module(features)
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
    args = parser.parse_args(argv)
    rows_per_s = measure_inprocess(
        args.model,
        args.batch,
        args.duration,
        warmup=args.warmup,
        cache_dir=args.cache_dir,
        artifact=args.artifact,
    )
    print(
        f"inprocess {args.model} batch={args.batch}: {rows_per_s:.0f} rows/s "
        f"(torch threads {torch.get_num_threads()})"
    )


if __name__ == "__main__":
    main()
