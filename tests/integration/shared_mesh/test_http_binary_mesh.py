"""Stock tritonclient.http against the full mesh: binary tensors in and out over REST."""

from __future__ import annotations

import asyncio

import numpy as np
import tritonclient.http as httpclient

from tests.integration.conftest import RunningMesh
from tests.integration.oip import mlp_input, reference


def _infer_mlp_binary(url: str, features: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    try:
        tensor = httpclient.InferInput("features", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features, binary_data=True)
        result = client.infer(
            "mlp", [tensor], outputs=[httpclient.InferRequestedOutput("probs", binary_data=True)],
            response_compression_algorithm="gzip",
        )
        probs: np.ndarray = result.as_numpy("probs")
        return probs
    finally:
        client.close()


async def test_binary_infer_on_the_mlp_matches_the_model_called_in_process(
    mesh: RunningMesh,
) -> None:
    features = mlp_input(4, seed=3)
    # The sync client blocks, and owns a gevent pool tied to its thread: one thread, start to end.
    probs = await asyncio.to_thread(
        _infer_mlp_binary, mesh.gateway.removeprefix("http://"), features
    )
    expected = reference(mesh.state_dir, "mlp", features)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
