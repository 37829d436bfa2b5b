"""The ONNX Runtime backend on both demo models, exported from their TorchScript artifacts.

Tolerances against the TorchScript reference (the same weights, another kernel library):
mlp rtol 1e-5 / atol 1e-5 (probabilities); encoder rtol 1e-4 / atol 1e-4 (384-wide
embeddings after six transformer layers; the measured difference is ~4e-7).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from services.batcher.core import Batcher
from services.batcher.workers import LocalWorkerPool
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    BatchingPolicy,
    InferRequest,
    ModelVersion,
    Rollout,
    Signature,
)
from services.mesh.infra.digests import sha256_of
from services.mesh.infra.settings import available_cores
from services.worker.artifacts import ArtifactCache
from services.worker.backends.base import BackendError, DeviceUnavailable, InputRejected
from services.worker.backends.onnx import CUDA_PROVIDER, OnnxBackend
from services.worker.backends.torchscript import TorchScriptBackend
from services.worker.core import Worker
from services.worker.demo_models import DemoModel
from services.worker.factory import backend_factory
from services.worker.onnx_export import convert_torchscript
from tests.waiting import wait_for
from tests.worker.stubs import RunClock, gil_held_elsewhere

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

TOLERANCE = {"mlp": (1e-5, 1e-5), "encoder": (1e-4, 1e-4)}
"""rtol, atol per demo model."""
EAGER = {"encoder": "services.worker.demo_models:TextEncoder"}
"""The encoder's scripted graph has control flow the exporter cannot follow: name its class
(the conversion would find it by itself, after a failed first try that costs a second)."""


@pytest.fixture(scope="module")
def onnx_files(
    demo_models: dict[str, DemoModel], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Both demo models converted to ONNX, once for this module."""
    outdir = tmp_path_factory.mktemp("onnx")
    return {
        name: convert_torchscript(
            model.artifact, Signature.from_json(model.signature), outdir / f"{name}.onnx",
            module=EAGER.get(name),
        ).artifact
        for name, model in demo_models.items()
    }


def _inputs(model: DemoModel, rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    if model.name == "encoder":
        return {"input_ids": rng.integers(0, 30_522, (rows, 64), dtype=np.int64)}
    return {"features": rng.standard_normal((rows, 32), dtype=np.float32)}


def _onnx(model: DemoModel, path: Path, **options: object) -> OnnxBackend:
    backend = OnnxBackend(model.signature, device_policy="cpu", **options)  # type: ignore[arg-type]
    backend.load(path)
    return backend


@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_outputs_equal_the_torchscript_reference(
    name: str, demo_models: dict[str, DemoModel], onnx_files: dict[str, Path]
) -> None:
    model = demo_models[name]
    reference = TorchScriptBackend(model.signature, device_policy="cpu")
    reference.load(model.artifact)
    served = _onnx(model, onnx_files[name])
    for rows in (1, 7):
        inputs = _inputs(model, rows)
        want, got = reference.run_batch(inputs), served.run_batch(inputs)
        assert got.keys() == want.keys()
        for output, expected in want.items():
            assert got[output].dtype == expected.dtype and got[output].shape == expected.shape
            rtol, atol = TOLERANCE[name]
            np.testing.assert_allclose(got[output], expected, rtol=rtol, atol=atol)


def test_session_options_are_set_for_serving(
    demo_models: dict[str, DemoModel], onnx_files: dict[str, Path]
) -> None:
    served = _onnx(demo_models["mlp"], onnx_files["mlp"], intra_op_threads=64)
    options = served.session_options
    assert options.intra_op_num_threads == available_cores() == served.intra_op_threads
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_a_small_model_warms_up_onto_one_thread(
    demo_models: dict[str, DemoModel], onnx_files: dict[str, Path]
) -> None:
    served = _onnx(demo_models["mlp"], onnx_files["mlp"], single_thread_below=10.0)
    seconds = served.warm_up(8)
    assert sorted(seconds) == [1, 2, 3, 4, 7, 8]
    assert served.intra_op_threads == served.session_options.intra_op_num_threads == 1
    assert 0 < served.fastest_batch_s < math.inf  # the worker's loop-or-thread decision reads it
    fixed = _onnx(demo_models["mlp"], onnx_files["mlp"], intra_op_threads=1,
                  single_thread_below=10.0)
    fixed.warm_up(2)
    assert fixed.session_options.intra_op_num_threads == 1


@pytest.mark.skipif(available_cores() < 2, reason="one core: one thread anyway")
def test_the_thread_decision_reads_one_threads_cpu_not_the_wall_clock(
    demo_models: dict[str, DemoModel], onnx_files: dict[str, Path]
) -> None:
    # A host where every run takes 10 ms of wall time (other processes starting) leaves a
    # cheap model on one thread: the decision reads its CPU cost on one thread...
    served = _onnx(demo_models["mlp"], onnx_files["mlp"], clock=RunClock(0.01))
    seconds = served.warm_up(8)
    assert served.intra_op_threads == served.session_options.intra_op_num_threads == 1
    assert served.single_thread_cost_s is not None  # read, and under the line: one thread
    assert max(seconds.values()) == pytest.approx(0.01)  # the published medians: wall time
    # ... and a model that costs 10 ms of CPU a batch gets a session on every core.
    costly = _onnx(demo_models["mlp"], onnx_files["mlp"], cost_clock=RunClock(0.01))
    costly.warm_up(8)
    assert costly.intra_op_threads == costly.session_options.intra_op_num_threads
    assert costly.intra_op_threads == available_cores()


@pytest.mark.skipif(available_cores() < 2, reason="one core: one thread anyway")
def test_a_busy_host_does_not_move_the_thread_decision(
    demo_models: dict[str, DemoModel], onnx_files: dict[str, Path]
) -> None:
    # Beside a thread holding the GIL, each run waits for it after ONNX Runtime's call (up
    # to the 5 ms switch interval): on an idle machine the wall-clock decision read that and
    # kept every core (this failed on it); the RunClock test above is the deterministic one.
    served = _onnx(demo_models["mlp"], onnx_files["mlp"])
    with gil_held_elsewhere():
        served.warm_up(8)
    assert served.intra_op_threads == served.session_options.intra_op_num_threads == 1


def test_a_bad_token_id_is_rejected_in_one_safe_line(
    demo_models: dict[str, DemoModel], onnx_files: dict[str, Path]
) -> None:
    served = _onnx(demo_models["encoder"], onnx_files["encoder"])
    with pytest.raises(InputRejected) as caught:
        served.run_batch({"input_ids": np.full((2, 64), 40_000, dtype=np.int64)})
    message = str(caught.value)
    assert "40000" in message and "\n" not in message and len(message) <= 200
    assert str(onnx_files["encoder"].parent) not in message


def test_a_signature_the_model_does_not_declare_is_refused_at_load(
    demo_models: dict[str, DemoModel], onnx_files: dict[str, Path]
) -> None:
    mlp = demo_models["mlp"]
    renamed = {**mlp.signature, "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 32]}]}
    with pytest.raises(BackendError, match="signature input 'x' is not in the model"):
        OnnxBackend(renamed, device_policy="cpu").load(onnx_files["mlp"])
    retyped = {**mlp.signature,
               "inputs": [{"name": "features", "datatype": "FP64", "shape": [-1, 32]}]}
    with pytest.raises(BackendError, match="'features' is FP64, the model's is tensor"):
        OnnxBackend(retyped, device_policy="cpu").load(onnx_files["mlp"])
    with pytest.raises(BackendError, match=r"cannot load ONNX model mlp\.pt: ") as caught:
        OnnxBackend(mlp.signature, device_policy="cpu").load(mlp.artifact)
    assert str(mlp.artifact.parent) not in str(caught.value)


@pytest.mark.skipif(CUDA_PROVIDER in ort.get_available_providers(), reason="CUDA build")
def test_cuda_without_the_cuda_provider_falls_back_only_when_allowed(
    demo_models: dict[str, DemoModel],
) -> None:
    signature = demo_models["mlp"].signature
    with pytest.raises(DeviceUnavailable, match="CUDAExecutionProvider"):
        OnnxBackend(signature, device_policy="cuda")
    fallen = OnnxBackend(signature, device_policy="cuda", cpu_fallback=True)
    assert fallen.device == "cpu" and fallen.device_fallback
    assert OnnxBackend(signature, device_policy="auto").device_fallback is None


async def test_a_worker_serves_an_onnx_version_through_a_batcher(
    demo_models: dict[str, DemoModel], onnx_files: dict[str, Path], tmp_path: Path
) -> None:
    mlp, artifact = demo_models["mlp"], onnx_files["mlp"]
    record = ModelVersion(
        "mlp", "2", Signature.from_json(mlp.signature), artifact.as_uri(),
        await asyncio.to_thread(sha256_of, artifact), platform="onnxruntime_onnx",
        batching=BatchingPolicy.from_json(mlp.batching), device="cpu",
    )
    config = StaticConfig({"rollouts/mlp": Rollout.stable("mlp", "2").to_json(),
                           "models/mlp/2": record.to_json()})
    features = _inputs(mlp, 4)["features"]
    reference = TorchScriptBackend(mlp.signature, device_policy="cpu")
    await asyncio.to_thread(reference.load, mlp.artifact)
    expected = (await asyncio.to_thread(reference.run_batch, {"features": features}))["probs"]
    async with aiohttp.ClientSession() as session:
        worker = Worker(
            ModelCatalog(config), models=("mlp",),
            artifacts=ArtifactCache(session, tmp_path / "cache", stores=[artifact.parent.as_uri()]),
            backend_factory=backend_factory(),
        )
        batcher = Batcher(ModelCatalog(config), LocalWorkerPool(worker))
        worker.start()
        batcher.start()
        try:
            await wait_for(lambda: "mlp/2" in worker.ready_versions(), timeout=60,
                           what="the worker to load the ONNX version")
            answers = await asyncio.gather(*(batcher.infer(InferRequest(
                "mlp", [Tensor.from_array("features", features[i:i + 1])], request_id=f"r{i}",
                version="2", deadline=time.time() + 30)) for i in range(len(features))))
        finally:
            await batcher.aclose()
            await worker.aclose()
    assert [answer.version for answer in answers] == ["2"] * len(features)
    probs = np.concatenate([answer.outputs[0].array() for answer in answers])
    rtol, atol = TOLERANCE["mlp"]
    np.testing.assert_allclose(probs, expected, rtol=rtol, atol=atol)


@pytest.mark.skipif(available_cores() < 2, reason="one core: one thread anyway")
def test_max_threads_caps_the_team_a_warm_up_may_choose(
    demo_models: dict[str, DemoModel], onnx_files: dict[str, Path]
) -> None:
    """A fused replica's share of the cores: a model costly enough for a team gets at most
    `max_threads` (10 ms of CPU a batch, faked: over the one-thread line)."""
    capped = _onnx(demo_models["mlp"], onnx_files["mlp"], cost_clock=RunClock(0.01),
                   max_threads=1)
    capped.warm_up(8)
    assert capped.intra_op_threads == capped.session_options.intra_op_num_threads == 1
    roomy = _onnx(demo_models["mlp"], onnx_files["mlp"], cost_clock=RunClock(0.01),
                  max_threads=64)
    roomy.warm_up(8)
    assert roomy.intra_op_threads == available_cores()
