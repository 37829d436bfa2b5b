"""A :class:`~services.worker.backends.base.Backend` that runs TorchScript (``torch.jit``) files.

The module is called positionally with one tensor per signature input, in signature order. It
may return a tensor (one output), a tuple or list (matched to signature outputs by position) or
a dict (matched by name).

``torch.jit.freeze`` / ``optimize_for_inference`` are deliberately not applied: on the demo
models they kept outputs bit-identical but gave no consistent CPU speedup, and
``optimize_for_inference`` made the MLP 3-4x slower.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from services.mesh.domain.datatypes import DTYPES
from services.worker.backends.base import (
    BackendError,
    fastest_run,
    model_call_failed,
    single_thread_cost,
    timed_sweep,
    warmup_sizes,
)
from services.worker.backends.devices import resolve_device
from services.worker.backends.torchscript_split import SplitLoads

SINGLE_THREAD_BELOW_S = 0.001
"""A CPU model whose largest warm-up batch takes less than this runs on one intra-op thread
(unless the worker's `threads` setting fixes the count)."""

_DEFAULT_THREADS = torch.get_num_threads()
"""torch's default intra-op thread count, read before anything here changes it."""

_CPU_LOADS = SplitLoads()
"""This process's CPU loads: a file loaded again reads its weights without the GIL
(services/worker/backends/torchscript_split.py)."""

_calling_thread = threading.local()
"""The intra-op thread count last set in each thread (`torch.set_num_threads` is per thread)."""

# OIP datatype -> torch dtype; numpy's come from the project's one table (`DTYPES`). BYTES has
# no tensor form, so it is absent.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}


@dataclass(frozen=True)
class _TensorSpec:
    """One signature entry: name, numpy dtype and shape (-1 for dynamic dims)."""

    name: str
    datatype: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, entry: Mapping[str, Any]) -> _TensorSpec:
        """Validate one ``{"name", "datatype", "shape"}`` entry of a signature."""
        name, datatype, shape = entry["name"], entry["datatype"], tuple(entry["shape"])
        if datatype not in _TORCH_DTYPES:
            raise BackendError(f"tensor {name!r}: datatype {datatype!r} is not supported")
        if not shape or any(not isinstance(d, int) or d < -1 or d == 0 for d in shape):
            raise BackendError(f"tensor {name!r}: bad shape {list(shape)}")
        return cls(name, datatype, DTYPES[datatype], shape)

    def dummy(self, batch_size: int) -> npt.NDArray[Any]:
        """Zeros shaped like this tensor, with ``batch_size`` rows and dynamic dims set to 1."""
        dims = [batch_size] + [d if d > 0 else 1 for d in self.shape[1:]]
        return np.zeros(dims, dtype=self.dtype)

    def check_output(self, array: npt.NDArray[Any], batch_size: int) -> None:
        """Raise :class:`BackendError` if a model output disagrees with this spec."""
        expected = (batch_size, *self.shape[1:])
        if len(array.shape) != len(expected) or any(
            want not in (-1, got) for want, got in zip(expected, array.shape, strict=True)
        ):
            raise BackendError(
                f"output {self.name!r} has shape {list(array.shape)}, expected {list(expected)}"
            )
        if array.dtype != self.dtype:
            raise BackendError(
                f"output {self.name!r} has dtype {array.dtype}, signature says {self.datatype}"
            )


class TorchScriptBackend:
    """Runs a TorchScript model described by an OIP-style signature.

    ``device_policy`` is resolved at construction (see
    :func:`~services.worker.backends.devices.resolve_device`). ``intra_op_threads`` sets torch's
    intra-op thread count for this model's batches; when None, the warm-up picks it: torch's
    default (at most ``max_threads``), or one thread for a model whose largest batch costs
    under ``single_thread_below`` seconds of CPU on one thread (``cost_clock``, the calling
    thread's CPU time: a test's fake stands for the model's cost). ``clock`` times the warm-up's
    published timings (a test's fake stands for a busy host).

    Why one thread for small models: after each parallel region OpenMP's threads spin-wait for
    the next (libgomp's default), so a model of ~50 µs a batch, run a few hundred times a
    second, kept a second thread spinning almost all the time: in the mesh the mlp worker
    spent ~4x more CPU in OpenMP's threads than on its event loop, and on a 2-core machine that
    CPU is taken from the other hops. One thread runs no team, so nothing spins; a
    compute-bound model (the encoder) keeps every thread.
    """

    def __init__(
        self,
        signature: Mapping[str, Any],
        *,
        device_policy: str = "auto",
        intra_op_threads: int | None = None,
        max_threads: int | None = None,
        single_thread_below: float = SINGLE_THREAD_BELOW_S,
        clock: Callable[[], float] = time.perf_counter,
        cost_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._inputs = [_TensorSpec.parse(entry) for entry in signature["inputs"]]
        self._outputs = [_TensorSpec.parse(entry) for entry in signature["outputs"]]
        if not self._inputs or not self._outputs:
            raise BackendError("a signature needs at least one input and one output")
        resolved = resolve_device(device_policy)
        self._device = torch.device("cuda", 0) if resolved == "cuda" else torch.device("cpu")
        self._device_name = str(self._device)  # read per batch; str(torch.device) is not free
        self._intra_op_threads = intra_op_threads
        # The team a warm-up may choose: torch's default, at most `max_threads`.
        self._threads = intra_op_threads or min(_DEFAULT_THREADS, max_threads or _DEFAULT_THREADS)
        self._single_thread_below = single_thread_below
        self._clock, self._cost_clock = clock, cost_clock
        self.single_thread_cost_s: float | None = None
        """CPU seconds of the largest warm-up batch on one thread, when the warm-up decided the
        thread count from it (None when the count is fixed, or on CUDA)."""
        self._module: torch.jit.ScriptModule | None = None
        self.fastest_batch_s = float("inf")
        """The fastest run of the largest warm-up batch on the threads chosen (seconds; inf
        before the warm-up): the worker runs batches of a model this quick on its event loop
        (services/worker/core.py, `Worker.inline_below`)."""

    @property
    def device(self) -> str:
        """The torch device the model runs on, e.g. ``"cpu"`` or ``"cuda:0"``."""
        return self._device_name

    @property
    def intra_op_threads(self) -> int:
        """The intra-op threads this model's batches run on (settled by the warm-up)."""
        return self._threads

    def load(self, artifact: Path) -> None:
        """Load a ``torch.jit.save`` file onto the device, in eval mode."""
        try:
            if self._device.type == "cpu":
                module = _CPU_LOADS.load(artifact)
            else:
                module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(artifact), map_location=self._device
                )
        except (OSError, RuntimeError, ValueError) as exc:
            raise BackendError(f"cannot load TorchScript model {artifact}: {exc}") from exc
        self._module = module.eval()

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        """Run zero-filled batches of many sizes up to ``max_batch_size``, four times over;
        returns the median seconds of the last three runs of each size.

        TorchScript's profiling executor re-specialises the graph as it meets new batch sizes
        (a one-off 25 ms stall per call on the mlp here); sweeping the sizes before the worker
        reports ready keeps that out of the first real requests' latency, and the untimed
        first sweep keeps it out of the timings.
        """
        dummies = {
            size: {spec.name: spec.dummy(size) for spec in self._inputs}
            for size in warmup_sizes(max_batch_size)
        }
        largest = dummies[max(dummies)]
        deciding = self._intra_op_threads is None and self._threads > 1 and not self._cuda
        if deciding and self.single_thread_cost_s is None:  # once: a re-warm-up keeps it
            # Decided on one thread's CPU time, which a busy host cannot inflate (see
            # single_thread_cost): small enough, and a team's hand-off and spin cost more than
            # they save.
            team, self._threads = self._threads, 1
            self.single_thread_cost_s = single_thread_cost(lambda: self._run_dummy(largest),
                                                           clock=self._cost_clock)
            if self.single_thread_cost_s >= self._single_thread_below:
                self._threads = team
        seconds = timed_sweep(lambda size: self._run_dummy(dummies[size]), list(dummies),
                              clock=self._clock)
        self.fastest_batch_s = fastest_run(lambda: self._run_dummy(largest), clock=self._clock)
        return seconds

    def _run_dummy(self, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
        self.run_batch(inputs)

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch; see :meth:`Backend.run_batch`. Raises :class:`BackendError`:
        :class:`~services.worker.backends.base.InputRejected` when the model raised because of
        the input, :class:`~services.worker.backends.base.ModelCallFailed` for its other errors."""
        module = self._loaded_module()
        self._configure_thread()
        arrays = [_input_array(spec, inputs) for spec in self._inputs]
        batch_size = _batch_size(self._inputs, arrays)
        try:
            with torch.inference_mode():
                tensors = [torch.from_numpy(a).to(self._device, non_blocking=True) for a in arrays]
                raw = module(*tensors)
                # .cpu() waits for the device, so the numpy arrays hold finished results.
                outputs = {name: _to_numpy(t) for name, t in self._match_outputs(raw).items()}
        except BackendError:
            raise
        except Exception as exc:  # the model's own error: one safe line, the rest chained
            raise model_call_failed(exc) from exc
        for spec in self._outputs:
            spec.check_output(outputs[spec.name], batch_size)
        return outputs

    def _configure_thread(self) -> None:
        # torch's intra-op (OpenMP) settings are per thread: a thread that never set them ran
        # the encoder ~20% slower than the main thread here. Set them when the calling thread
        # last ran with another count (a fused worker's thread runs models of both kinds).
        if getattr(_calling_thread, "intra_op_threads", None) != self._threads:
            torch.set_num_threads(self._threads)
            _calling_thread.intra_op_threads = self._threads

    @property
    def _cuda(self) -> bool:
        return self._device.type == "cuda"

    def unload(self) -> None:
        """Drop the model; on CUDA also return cached blocks to the driver."""
        self._module = None
        if self._cuda:
            torch.cuda.empty_cache()

    def _loaded_module(self) -> torch.jit.ScriptModule:
        if self._module is None:
            raise BackendError("no model loaded: call load() first")
        return self._module

    def _match_outputs(self, raw: object) -> dict[str, torch.Tensor]:
        names = [spec.name for spec in self._outputs]
        if isinstance(raw, torch.Tensor):
            values: Sequence[object] = [raw]
        elif isinstance(raw, tuple | list):
            values = raw
        elif isinstance(raw, dict):
            missing = [name for name in names if name not in raw]
            if missing:
                raise BackendError(f"model returned keys {sorted(raw)}, missing {missing}")
            values = [raw[name] for name in names]
        else:
            raise BackendError(f"model returned {type(raw).__name__}, expected tensor(s)")
        if len(values) != len(names):
            raise BackendError(f"model returned {len(values)} outputs, signature has {len(names)}")
        tensors: list[torch.Tensor] = []
        for name, value in zip(names, values, strict=True):
            if not isinstance(value, torch.Tensor):
                raise BackendError(f"output {name!r} is a {type(value).__name__}, not a tensor")
            tensors.append(value)
        return dict(zip(names, tensors, strict=True))


def _input_array(spec: _TensorSpec, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """The input for ``spec`` as a C-contiguous, writable array, copied only when it must be."""
    if spec.name not in inputs:
        raise BackendError(f"missing input {spec.name!r}; got {sorted(inputs)}")
    try:
        array = np.asarray(inputs[spec.name]).astype(spec.dtype, casting="safe", copy=False)
    except TypeError as exc:
        raise BackendError(f"input {spec.name!r}: {exc}") from exc
    if len(array.shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape[1:], array.shape[1:], strict=True)
    ):
        raise BackendError(
            f"input {spec.name!r} has shape {list(array.shape)}, signature says {list(spec.shape)}"
        )
    array = np.ascontiguousarray(array)
    # torch warns on read-only memory (e.g. np.frombuffer over bytes) and numpy cannot mark
    # such a view writable, so only those arrays are copied.
    return array if array.flags.writeable else array.copy()


def _batch_size(specs: Sequence[_TensorSpec], arrays: Sequence[npt.NDArray[Any]]) -> int:
    pairs = zip(specs, arrays, strict=True)
    sizes: dict[str, int] = {spec.name: array.shape[0] for spec, array in pairs}
    if len(set(sizes.values())) != 1:
        raise BackendError(f"inputs disagree on batch size: {sizes}")
    return next(iter(sizes.values()))


def _to_numpy(tensor: torch.Tensor) -> npt.NDArray[Any]:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())
