"""A model that raises on a batch: the caller is told one safe line and whose fault it was
(the input's: `InvalidInput`; the model's: `ModelFailed`); the log keeps the whole traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import (
    InfermeshError,
    InternalError,
    InvalidInput,
    ModelFailed,
    from_wire,
)
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchingPolicy, ModelVersion, Rollout, Signature
from services.worker.backends.base import (
    BackendError,
    InputRejected,
    ModelCallFailed,
    model_call_failed,
)
from services.worker.backends.torchscript import TorchScriptBackend
from services.worker.core import Worker
from services.worker.demo_models import DemoModel

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

LEAKS = ("Traceback", "/", ".py", "File ", "TorchScript", "\n")


@pytest.mark.parametrize("bad_id", [1_000_000, -1])
def test_a_token_id_past_the_encoders_vocabulary_is_the_inputs_fault_in_one_safe_line(
    demo_models: dict[str, DemoModel], bad_id: int
) -> None:
    encoder = demo_models["encoder"]
    backend = TorchScriptBackend(encoder.signature, device_policy="cpu")
    backend.load(encoder.artifact)
    ids = np.zeros((3, 64), dtype=np.int64)
    ids[1, 5] = bad_id
    with pytest.raises(InputRejected) as raised:
        backend.run_batch({"input_ids": ids})
    assert str(raised.value) == "RuntimeError: index out of range in self"
    assert "Traceback of TorchScript" in str(raised.value.__cause__)  # kept for the log


@pytest.mark.parametrize(("raised", "expected", "message"), [
    (IndexError("index 7 is out of bounds for dimension 0 with size 3"), InputRejected,
     "IndexError: index 7 is out of bounds for dimension 0 with size 3"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (3x4 and 5x6)"), ModelCallFailed,
     "RuntimeError: mat1 and mat2 shapes cannot be multiplied (3x4 and 5x6)"),
    (ValueError('Traceback (most recent call last):\n  File "/srv/app/model.py", line 3\n'
                "ValueError: cannot open /srv/app/weights/w.bin"), ModelCallFailed,
     "ValueError: cannot open <path>"),
    (RuntimeError(""), ModelCallFailed, "RuntimeError"),
])
def test_a_models_error_is_classified_and_stripped_of_frames_and_paths(
    raised: Exception, expected: type[ModelCallFailed], message: str
) -> None:
    error = model_call_failed(raised)
    assert type(error) is expected and str(error) == message


def test_a_model_failure_crosses_a_link_with_its_type() -> None:
    assert type(from_wire(ModelFailed("RuntimeError: boom").to_wire())) is ModelFailed


class _Artifacts:
    async def fetch(self, spec: ModelVersion) -> Path:
        return Path("/dev/null")


class _RaisingBackend:
    """Loads nothing; every batch raises what a broken model (or another backend) raises."""

    device = "cpu"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def load(self, artifact: Path) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        return {}

    def run_batch(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        raise self.error

    def unload(self) -> None:
        pass


@pytest.mark.parametrize(("error", "expected"), [
    (RuntimeError('Traceback (most recent call last):\n  File "/srv/m.py", line 9\n'
                  "RuntimeError: CUDA error: an illegal memory access"), ModelFailed),
    (InputRejected("RuntimeError: index out of range in self"), InvalidInput),
    (BackendError("output 'y' has shape [3], expected [2, 2]"), InternalError),  # no split
])
async def test_the_worker_answers_a_failed_model_call_safely_and_logs_it_whole(
    caplog: pytest.LogCaptureFixture, error: Exception, expected: type[InfermeshError]
) -> None:
    signature = Signature.from_json({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    })
    spec = ModelVersion("m", "1", signature, "file:///dev/null", "0" * 64,
                        batching=BatchingPolicy(max_batch_size=4, max_queue_delay_ms=1))
    config = StaticConfig({"rollouts/m": Rollout.stable("m", "1").to_json(),
                           "models/m/1": spec.to_json()})
    worker = Worker(ModelCatalog(config), models=("m",), artifacts=_Artifacts(),
                    backend_factory=lambda _: _RaisingBackend(error))
    ready = asyncio.Event()
    worker.subscribe(ready.set)
    worker.start()
    try:
        async with asyncio.timeout(30):
            await ready.wait()
        batch = Batch("m", "1", [Tensor.from_array("x", np.zeros((2, 2), np.float32))], [1, 1])
        with caplog.at_level(logging.WARNING), pytest.raises(expected) as raised:
            await worker.run_batch(batch)
    finally:
        await worker.aclose()
    assert type(raised.value) is expected
    assert not any(leak in raised.value.message for leak in LEAKS), raised.value.message
    assert any(record.exc_info for record in caplog.records)  # the whole traceback, logged
