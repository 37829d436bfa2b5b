"""TorchScriptBackend and resolve_device against tiny scripted models."""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from services.worker.backends.base import BackendError, DeviceUnavailable
from services.worker.backends.devices import resolve_device
from services.worker.backends.torchscript import TorchScriptBackend
from tests.worker.stubs import RunClock, gil_held_elsewhere

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class _Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() >= 0):
            raise RuntimeError("weights exploded")
        return x


class _TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x + 1


class _NamedOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"plus_one": x + 1, "y": x}


class _FirstRowOnly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1]


def _loaded(
    module: nn.Module, path: Path, signature: dict[str, Any] = SIGNATURE
) -> TorchScriptBackend:
    torch.jit.save(torch.jit.script(module), str(path))
    backend = TorchScriptBackend(signature, device_policy="cpu")
    backend.load(path)
    return backend


def _rows(count: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(count * 3, dtype=np.float32).reshape(count, 3)}


def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_resolve_device_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_resolve_device_cuda_without_gpu_is_unavailable() -> None:
    with pytest.raises(DeviceUnavailable, match="cuda"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailable):
        TorchScriptBackend(SIGNATURE, device_policy="cuda")


def test_run_batch_returns_named_outputs_per_row(tmp_path: Path) -> None:
    backend = _loaded(_Double(), tmp_path / "double.pt")
    backend.warm_up(8)
    out = backend.run_batch(_rows(4))
    assert backend.device == "cpu"
    assert list(out) == ["y"] and out["y"].dtype == np.float32
    np.testing.assert_array_equal(out["y"], _rows(4)["x"] * 2)


def test_read_only_and_narrower_inputs_are_accepted(tmp_path: Path) -> None:
    backend = _loaded(_Double(), tmp_path / "double.pt")
    read_only = np.frombuffer(np.ones(6, dtype=np.float32).tobytes(), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = backend.run_batch({"x": read_only.reshape(2, 3)})
    np.testing.assert_array_equal(out["y"], np.full((2, 3), 2, dtype=np.float32))
    out = backend.run_batch({"x": np.ones((2, 3), dtype=np.float16)})
    assert out["y"].dtype == np.float32


def test_model_exception_becomes_backend_error(tmp_path: Path) -> None:
    backend = _loaded(_Raises(), tmp_path / "raises.pt")
    with pytest.raises(BackendError, match="weights exploded"):
        backend.run_batch(_rows(2))


def test_wrong_output_count_is_a_backend_error(tmp_path: Path) -> None:
    backend = _loaded(_TwoOutputs(), tmp_path / "two.pt")
    with pytest.raises(BackendError, match="2 outputs, signature has 1"):
        backend.run_batch(_rows(2))


def test_tuple_and_dict_outputs_map_to_signature_names(tmp_path: Path) -> None:
    signature = {
        **SIGNATURE,
        "outputs": [*SIGNATURE["outputs"], {**SIGNATURE["outputs"][0], "name": "plus_one"}],
    }
    for module in (_TwoOutputs(), _NamedOutputs()):
        out = _loaded(module, tmp_path / "multi.pt", signature).run_batch(_rows(2))
        np.testing.assert_array_equal(out["plus_one"], out["y"] + 1)


def test_output_batch_dim_must_match_inputs(tmp_path: Path) -> None:
    backend = _loaded(_FirstRowOnly(), tmp_path / "first.pt")
    with pytest.raises(BackendError, match=r"shape \[1, 3\], expected \[3, 3\]"):
        backend.run_batch(_rows(3))


def test_bad_inputs_are_backend_errors(tmp_path: Path) -> None:
    backend = _loaded(_Double(), tmp_path / "double.pt")
    with pytest.raises(BackendError, match="missing input 'x'"):
        backend.run_batch({"z": _rows(1)["x"]})
    with pytest.raises(BackendError, match="shape"):
        backend.run_batch({"x": np.zeros((2, 4), dtype=np.float32)})
    with pytest.raises(BackendError, match="'x'"):
        backend.run_batch({"x": np.zeros((2, 3), dtype=np.float64)})


def test_lifecycle_errors(tmp_path: Path) -> None:
    backend = TorchScriptBackend(SIGNATURE, device_policy="cpu")
    with pytest.raises(BackendError, match="load"):
        backend.run_batch(_rows(1))
    with pytest.raises(BackendError, match="missing.pt"):
        backend.load(tmp_path / "missing.pt")
    backend = _loaded(_Double(), tmp_path / "double.pt")
    backend.unload()
    with pytest.raises(BackendError):
        backend.run_batch(_rows(1))


def test_bytes_datatype_is_rejected() -> None:
    signature = {**SIGNATURE, "inputs": [{"name": "x", "datatype": "BYTES", "shape": [-1]}]}
    with pytest.raises(BackendError, match="BYTES"):
        TorchScriptBackend(signature, device_policy="cpu")


def _threads_after_batch(backend: TorchScriptBackend) -> int:
    """Run one batch and return the intra-op threads torch uses in this thread afterwards."""
    backend.run_batch(_rows(2))
    return torch.get_num_threads()


def _threads_in_fresh_thread(backend: TorchScriptBackend) -> int:
    """`_threads_after_batch` in a new thread, as the worker's inference thread runs it."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_threads_after_batch, backend).result()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here anyway")
def test_a_small_model_runs_on_one_thread_after_its_warm_up(tmp_path: Path) -> None:
    # Several intra-op threads spin between a small model's batches (OpenMP's wait policy),
    # burning a core for a ~50 µs forward; one thread runs no team at all.
    backend = _loaded(_Double(), tmp_path / "double.pt")
    default = backend.intra_op_threads
    # torch's default at import, several here (the skipif above; not read again now: a test
    # before this one may have left another count in this process).
    assert default > 1
    with ThreadPoolExecutor(max_workers=1) as pool:
        timings = pool.submit(backend.warm_up, 8).result()
    assert backend.intra_op_threads == 1
    assert set(timings) == {1, 2, 3, 4, 7, 8}
    assert _threads_in_fresh_thread(backend) == 1
    # Measured again on the one thread: what the worker decides running on its loop from.
    assert 0 < backend.fastest_batch_s < math.inf


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here anyway")
def test_the_thread_decision_reads_one_threads_cpu_not_a_busy_hosts_wall_clock(
    tmp_path: Path,
) -> None:
    # A host where every run takes 10 ms of wall time (the fused plane's start-up read the
    # mlp's fastest of 7 runs as 9.2 ms, and the wall-clock decision kept two spinning
    # threads): the decision reads the model's CPU cost on one thread instead...
    torch.jit.save(torch.jit.script(_Double()), str(tmp_path / "double.pt"))
    busy = TorchScriptBackend(SIGNATURE, device_policy="cpu", clock=RunClock(0.01))
    busy.load(tmp_path / "double.pt")
    timings = busy.warm_up(8)
    assert busy.intra_op_threads == 1 and busy.single_thread_cost_s is not None
    assert max(timings.values()) == pytest.approx(0.01)  # published: the wall clock's
    # ... and a model that costs 10 ms of CPU a batch keeps its team.
    cost = RunClock(0.01)
    costly = TorchScriptBackend(SIGNATURE, device_policy="cpu", cost_clock=cost)
    costly.load(tmp_path / "double.pt")
    costly.warm_up(8)
    assert costly.intra_op_threads > 1  # torch's default team (see the skipif)
    # A later warm-up (a bigger max_batch_size, while serving) keeps the decision: it does
    # not run the model's batches on one thread again to re-read it.
    reads = cost.reads
    costly.warm_up(16)
    assert cost.reads == reads and costly.intra_op_threads > 1


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here anyway")
def test_a_warm_up_beside_a_thread_holding_the_gil_keeps_one_thread(tmp_path: Path) -> None:
    # The real contention: each run waits for the GIL after the model's call (up to the 5 ms
    # switch interval). On an idle machine the wall-clock decision read ~5 ms here and kept
    # two threads; a loaded one can shorten the waits (the releasing thread takes the GIL
    # back before the spinner is scheduled), so the test above is the deterministic one.
    backend = _loaded(_Double(), tmp_path / "double.pt")
    with gil_held_elsewhere():
        backend.warm_up(8)
    assert backend.intra_op_threads == 1


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here anyway")
def test_a_slow_model_or_a_fixed_count_keeps_its_threads(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(_Double()), str(tmp_path / "double.pt"))
    slow = TorchScriptBackend(SIGNATURE, device_policy="cpu", single_thread_below=0.0)
    fixed = TorchScriptBackend(SIGNATURE, device_policy="cpu", intra_op_threads=2)
    for backend in (slow, fixed):
        backend.load(tmp_path / "double.pt")
        backend.warm_up(4)
        assert backend.intra_op_threads == 2
        assert _threads_in_fresh_thread(backend) == 2
    # One thread alternating between a one-thread model and a two-thread one follows each.
    small = _loaded(_Double(), tmp_path / "small.pt")
    small.warm_up(4)
    with ThreadPoolExecutor(max_workers=1) as pool:
        counts = [pool.submit(_threads_after_batch, b).result() for b in (small, fixed, small)]
    assert counts == [1, 2, 1]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here anyway")
def test_max_threads_caps_the_team_a_warm_up_may_choose(tmp_path: Path) -> None:
    """A fused replica's share of the cores (`INFERMESH_WORKER_MAX_THREADS`): a model costly
    enough for a team gets at most that many threads; the cap does not fix a count."""
    torch.jit.save(torch.jit.script(_Double()), str(tmp_path / "double.pt"))
    capped = TorchScriptBackend(SIGNATURE, device_policy="cpu", single_thread_below=0.0,
                                max_threads=1)
    roomy = TorchScriptBackend(SIGNATURE, device_policy="cpu", single_thread_below=0.0,
                               max_threads=64)
    for backend in (capped, roomy):
        backend.load(tmp_path / "double.pt")
        backend.warm_up(4)
    assert capped.intra_op_threads == _threads_in_fresh_thread(capped) == 1
    assert roomy.intra_op_threads == torch.get_num_threads()
