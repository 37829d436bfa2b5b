"""bench.placement's ONNX stand-in: the TorchScript stand-in's model, for ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench import placement


def test_the_onnx_standin_computes_what_the_torchscript_one_does(tmp_path: Path) -> None:
    onnx_file = placement.standin_onnx(tmp_path)
    scripted = torch.jit.load(str(placement.standin_artifact(tmp_path)))  # type: ignore[no-untyped-call]
    ids = np.random.default_rng(0).integers(0, 30_522, (3, placement.TOKENS), dtype=np.int64)
    expected = scripted(torch.from_numpy(ids)).detach().numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    [got] = session.run(None, {"input_ids": ids})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_catalog_names_the_platform_by_the_files_suffix(tmp_path: Path) -> None:
    for name, platform in (("m.onnx", "onnxruntime_onnx"), ("m.pt", "pytorch_torchscript")):
        found = placement.catalog("standin", tmp_path / name, placement.STANDIN_SIGNATURE,
                                  versions=2, max_batch_size=4)
        assert found.version("standin", "2").platform == platform
