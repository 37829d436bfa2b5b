"""A real Triton server serving the demo mlp, for the Triton backend's tests.

Run by `tests/worker/triton_fixture.py` with the Python of the pytriton venv (not the
project's: pytriton pins numpy<2 and its Python backend needs Debian's Python), so it imports
nothing from the project. `nvidia-pytriton` starts its bundled `tritonserver` (CPU) and binds
a numpy replica of the demo mlp, whose weights the fixture exported from the TorchScript
artifact to an `.npz` (`layers.0.weight`, `layers.0.bias`, ... as in the module's state dict).

    python triton_server.py WEIGHTS.npz --workspace DIR --grpc-port P --http-port Q \
        --metrics-port R

It serves until SIGINT, then stops Triton and cleans its workspace.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from pytriton.decorators import batch  # type: ignore[import-not-found,unused-ignore]
from pytriton.model_config import ModelConfig, Tensor  # type: ignore[import-not-found,unused-ignore]
from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found,unused-ignore]

MODEL_NAME = "mlp"
MAX_BATCH_SIZE = 64
LAYERS = (0, 2, 4)
"""Indices of the Linear layers in the demo mlp's `nn.Sequential` (ReLU between them)."""


def mlp_function(weights: dict[str, Any]) -> Any:
    """The demo mlp (Linear-ReLU-Linear-ReLU-Linear-softmax) as a batched numpy function."""

    @batch  # type: ignore[untyped-decorator,unused-ignore]
    def infer(features: np.ndarray) -> dict[str, np.ndarray]:
        hidden = features.astype(np.float32)
        for i, layer in enumerate(LAYERS):
            hidden = hidden @ weights[f"layers.{layer}.weight"].T + weights[f"layers.{layer}.bias"]
            if i < len(LAYERS) - 1:
                hidden = np.maximum(hidden, 0.0)
        shifted = np.exp(hidden - hidden.max(axis=-1, keepdims=True))
        return {"probs": (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("weights")
    parser.add_argument("--workspace", required=True)
    for port in ("--grpc-port", "--http-port", "--metrics-port"):
        parser.add_argument(port, type=int, required=True)
    args = parser.parse_args()
    weights = {k: v.astype(np.float32) for k, v in np.load(args.weights).items()}
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port,
                          http_address="127.0.0.1", http_port=args.http_port,
                          metrics_port=args.metrics_port)
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=MODEL_NAME, infer_func=mlp_function(weights),
            inputs=[Tensor(name="features", dtype=np.float32, shape=(32,))],
            outputs=[Tensor(name="probs", dtype=np.float32, shape=(2,))],
            config=ModelConfig(max_batch_size=MAX_BATCH_SIZE),
        )
        triton.serve()


if __name__ == "__main__":
    main()
