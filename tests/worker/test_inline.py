"""When a worker is told to (`inline_below`), a quick CPU model's batches run on its event loop,
not in its inference thread; a slow one, a remote one, one on CUDA or a stalling failpoint keep
the thread, and so does every model when it is not told to (the default)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, Signature, TensorSpec
from services.mesh.infra.failpoints import set_failpoints
from services.mesh.infra.settings import load_settings
from services.worker.core import INLINE_BELOW_S
from services.worker.settings import WorkerSettings
from tests.worker.stubs import ready_worker

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
)


class ThreadRecordingBackend:
    """Doubles `x`; records the thread each batch ran on. `fastest_batch_s` is what a real
    backend measures in its warm-up (None: a backend that does not say, as Triton's)."""

    def __init__(self, fastest_batch_s: float | None, device: str = "cpu") -> None:
        if fastest_batch_s is not None:
            self.fastest_batch_s = fastest_batch_s
        self.device = device
        self.threads: list[int] = []

    def load(self, artifact: Path) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        return {1: 1e-5}

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.threads.append(threading.get_ident())
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        pass


async def _ran_on_loop(
    backend: ThreadRecordingBackend, inline_below: float | None = INLINE_BELOW_S
) -> bool:
    """Whether a batch ran on the calling event loop's thread (`inline_below`: the worker's,
    None: its default); its result is checked too."""
    options = {} if inline_below is None else {"inline_below": inline_below}
    worker = await ready_worker(backend, SIGNATURE, **options)
    try:
        x = np.arange(6, dtype=np.float32).reshape(3, 2)
        result = await worker.run_batch(Batch("m", "1", [Tensor.from_array("x", x)], [3]),
                                        timeout=30)  # fmt: skip
    finally:
        await worker.aclose()
    np.testing.assert_array_equal(result.outputs[0].array(), x * 2)
    assert len(backend.threads) == 1
    return backend.threads[0] == threading.get_ident()


@pytest.fixture
def no_failpoints() -> Iterator[None]:
    set_failpoints("")
    yield
    set_failpoints("")


async def test_a_quick_cpu_model_runs_on_the_event_loop(no_failpoints: None) -> None:
    assert await _ran_on_loop(ThreadRecordingBackend(INLINE_BELOW_S / 10))


@pytest.mark.parametrize("backend, inline_below", [
    (ThreadRecordingBackend(INLINE_BELOW_S * 2), INLINE_BELOW_S),  # too slow for the loop
    (ThreadRecordingBackend(None), INLINE_BELOW_S),  # says nothing of its speed (remote)
    (ThreadRecordingBackend(1e-6, device="cuda:0"), INLINE_BELOW_S),  # the device's own queue
    (ThreadRecordingBackend(1e-6), 0.0),  # turned off
    (ThreadRecordingBackend(1e-6), None),  # not asked: off by default (ARCHITECTURE.md)
], ids=["slow", "unmeasured", "cuda", "off", "default"])  # fmt: skip
async def test_other_models_run_in_the_inference_thread(
    backend: ThreadRecordingBackend, inline_below: float | None, no_failpoints: None
) -> None:
    assert not await _ran_on_loop(backend, inline_below)


async def test_a_stalling_failpoint_keeps_batches_off_the_loop(no_failpoints: None) -> None:
    # `worker.run_batch=sleep:<ms>` models a slow model: on the loop it would stall the worker.
    set_failpoints("worker.run_batch=sleep:1")
    assert not await _ran_on_loop(ThreadRecordingBackend(1e-6))



@pytest.mark.parametrize("value", ["-0.1", "nan", "5000"])
def test_a_bad_inline_setting_names_the_field(value: str) -> None:
    with pytest.raises(InvalidInput, match="inline_below_ms"):
        load_settings(WorkerSettings, "worker", {"INFERMESH_WORKER_INLINE_BELOW_MS": value})


def test_the_inline_setting_reaches_the_worker_in_seconds() -> None:
    env = {"INFERMESH_WORKER_INLINE_BELOW_MS": "0.25"}
    settings = load_settings(WorkerSettings, "worker", env)
    assert settings.inline_below_ms / 1000 == INLINE_BELOW_S
    assert load_settings(WorkerSettings, "worker", {}).inline_below_ms == 0.0
