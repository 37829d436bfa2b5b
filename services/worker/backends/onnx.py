"""A :class:`~services.worker.backends.base.Backend` that runs ``.onnx`` files with ONNX Runtime.

Platform name ``onnxruntime_onnx`` (Triton's). Inputs are fed and outputs fetched by their
signature names; at load the session's own inputs and outputs are checked against the
signature, so a mismatch is a load error naming the tensor, not a failure on the first batch.

Session options are set for serving beside an event loop on a few cores:

- intra-op threads from the worker's ``threads`` setting, never more than this process's cores;
  when the setting is 0 the warm-up decides as the TorchScript backend does: every core, or
  one thread for a model whose largest warm-up batch costs under ``single_thread_below``
  seconds of CPU on one thread (then no thread team exists to hand work to). The session opens
  on one thread, the warm-up reads that CPU time (the fastest of 7 runs, in the calling
  thread's CPU clock: waits for a core or the GIL do not count, which wall-clock readings
  taken while other processes start did) and reopens it on every core for a larger model;
- inter-op threads 1 and sequential execution: a batch is one graph run, nothing to overlap;
- ``session.intra_op.allow_spinning = 0``: ONNX Runtime's pool threads otherwise spin after
  each run waiting for the next, burning the CPU the worker's event loop and the other hops
  need (the same effect OpenMP's spin had on the TorchScript mlp);
- graph optimisation ``ORT_ENABLE_ALL``.

``CUDAExecutionProvider`` comes first when this onnxruntime build has it and the device policy
allows (``auto`` or ``cuda``); ``cuda`` on a build or host without it raises
:class:`~services.worker.backends.base.DeviceUnavailable` unless ``cpu_fallback``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnxruntime as ort

from services.mesh.domain.datatypes import ORT_TYPE_NAMES
from services.mesh.domain.types import Signature
from services.mesh.infra.settings import available_cores
from services.worker.backends.base import (
    BackendError,
    InputRejected,
    ModelCallFailed,
    fastest_run,
    model_call_failed,
    sanitised_reason,
    single_thread_cost,
    timed_sweep,
    warmup_sizes,
)
from services.worker.backends.devices import choose_device
from services.worker.backends.specs import BackendTensor, batch_size, parse_signature, tensors_of

PLATFORM = "onnxruntime_onnx"
SINGLE_THREAD_BELOW_S = 0.001
"""As the TorchScript backend's: a CPU model faster than this per largest batch runs on one
intra-op thread (unless the worker's `threads` setting fixes the count)."""
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# ONNX Runtime's words for an index past the table it gathers from (a token id too large).
_ORT_INPUT_FAULTS = re.compile(r"out of (data )?bounds|must be within the inclusive range")


class OnnxBackend:
    """Runs an ONNX model described by a signature (typed, or its JSON form).

    ``intra_op_threads`` (the worker's ``threads``; None or 0: the warm-up decides) is capped at
    :func:`available_cores`, and so is the team the warm-up may choose, at most ``max_threads``
    (the worker's ``max_threads``) too. ``clock`` times the warm-up (a test's fake stands for
    a busy host); ``cost_clock`` reads the one-thread CPU cost the thread count is decided
    from.
    """

    def __init__(
        self,
        signature: Signature | Mapping[str, Any],
        *,
        device_policy: str = "auto",
        cpu_fallback: bool = False,
        intra_op_threads: int | None = None,
        max_threads: int | None = None,
        single_thread_below: float = SINGLE_THREAD_BELOW_S,
        clock: Callable[[], float] = time.perf_counter,
        cost_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._inputs, self._outputs = tensors_of(parse_signature(signature))
        cuda_built = CUDA_PROVIDER in ort.get_available_providers()
        choice = choose_device(
            device_policy, cpu_fallback=cpu_fallback, cuda_available=cuda_built,
            why_not=f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER}",
        )
        self._cuda = choice.device == "cuda"
        self.device_fallback = choice.fallback
        """Why the version runs on CPU though its policy asked for CUDA (None: it does not)."""
        cores = available_cores()
        cores = min(cores, max_threads or cores)
        self._fixed_threads = min(intra_op_threads, cores) if intra_op_threads else None
        self._cores = cores
        self._deciding = self._fixed_threads is None and cores > 1 and not self._cuda
        # Deciding: opened on one thread, for the warm-up to read its cost (see warm_up).
        self._threads = 1 if self._deciding else self._fixed_threads or cores
        self._single_thread_below = single_thread_below
        self._clock, self._cost_clock = clock, cost_clock
        self.single_thread_cost_s: float | None = None
        """CPU seconds of the largest warm-up batch on one thread, when the warm-up decided the
        thread count from it (None when the count is fixed, or on CUDA)."""
        self._artifact: Path | None = None
        self._session: ort.InferenceSession | None = None
        self.fastest_batch_s = float("inf")
        """The fastest run of the largest warm-up batch (seconds; inf before the warm-up):
        the worker runs batches of a model this quick on its event loop."""

    @property
    def device(self) -> str:
        """``"cuda:0"`` when the session runs on CUDA, else ``"cpu"``."""
        return "cuda:0" if self._cuda else "cpu"

    @property
    def intra_op_threads(self) -> int:
        """The intra-op threads this model's batches run on (settled by the warm-up)."""
        return self._threads

    @property
    def session_options(self) -> ort.SessionOptions:
        """The options the loaded session runs with (what ONNX Runtime reports back)."""
        return self._loaded_session().get_session_options()

    def load(self, artifact: Path) -> None:
        """Open an inference session on ``artifact`` and check it against the signature."""
        self._session = self._open(artifact)
        self._artifact = artifact

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        """Run zero-filled batches of many sizes up to ``max_batch_size``; the median seconds
        per size (:func:`~services.worker.backends.base.timed_sweep`). Where the thread count
        is the warm-up's to decide, the session (open on one thread) is first timed in CPU
        seconds on the largest batch and reopened on every core when that is over the line
        (see the module docstring)."""
        dummies = {
            size: {spec.name: spec.dummy(size) for spec in self._inputs}
            for size in warmup_sizes(max_batch_size)
        }
        largest = dummies[max(dummies)]
        if self._deciding and self.single_thread_cost_s is None:
            self.single_thread_cost_s = single_thread_cost(lambda: self._run_dummy(largest),
                                                           clock=self._cost_clock)
            if self.single_thread_cost_s >= self._single_thread_below:
                self._threads = self._cores
                self._session = self._open(self._loaded_artifact())
        seconds = self._sweep(dummies)
        self.fastest_batch_s = fastest_run(lambda: self._run_dummy(largest), clock=self._clock)
        return seconds

    def _sweep(self, dummies: Mapping[int, Mapping[str, npt.NDArray[Any]]]) -> dict[int, float]:
        return timed_sweep(lambda size: self._run_dummy(dummies[size]), list(dummies),
                           clock=self._clock)

    def _run_dummy(self, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
        self.run_batch(inputs)

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch; see :meth:`Backend.run_batch`. The model's own errors raise
        :class:`InputRejected` (an index out of range) or :class:`ModelCallFailed`, one line."""
        session = self._loaded_session()
        arrays = [spec.input_array(inputs) for spec in self._inputs]
        rows = batch_size(self._inputs, arrays)
        names = [spec.name for spec in self._outputs]
        feed = {spec.name: array for spec, array in zip(self._inputs, arrays, strict=True)}
        try:
            results = session.run(names, feed)
        except Exception as exc:  # the model's own error: one safe line, the rest chained
            raise _model_error(exc) from exc
        outputs = dict(zip(names, results, strict=True))
        for spec in self._outputs:
            spec.check_output(outputs[spec.name], rows)
        return outputs

    def unload(self) -> None:
        """Drop the session (its memory, host or device, goes with it)."""
        self._session = None
        self._artifact = None

    def _open(self, artifact: Path) -> ort.InferenceSession:
        providers = [CUDA_PROVIDER, CPU_PROVIDER] if self._cuda else [CPU_PROVIDER]
        try:
            session = ort.InferenceSession(
                str(artifact), sess_options=serving_options(self._threads), providers=providers
            )
        except Exception as exc:  # onnxruntime's errors are pybind types, not one base class
            raise BackendError(
                f"cannot load ONNX model {artifact.name}: {sanitised_reason(exc)}"
            ) from exc
        _check_session(session, self._inputs, self._outputs)
        return session

    def _loaded_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise BackendError("no model loaded: call load() first")
        return self._session

    def _loaded_artifact(self) -> Path:
        if self._artifact is None:
            raise BackendError("no model loaded: call load() first")
        return self._artifact


def serving_options(intra_op_threads: int) -> ort.SessionOptions:
    """Session options for serving (see the module docstring)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Fatal only: its errors reach the caller as exceptions, logging them too doubled each one.
    options.log_severity_level = 4
    return options


def _check_session(
    session: ort.InferenceSession, inputs: list[BackendTensor], outputs: list[BackendTensor]
) -> None:
    """BackendError naming the first signature tensor the model lacks or types differently."""
    for side, specs, args in (("input", inputs, session.get_inputs()),
                              ("output", outputs, session.get_outputs())):
        declared = {arg.name: arg for arg in args}
        for spec in specs:
            arg = declared.get(spec.name)
            if arg is None:
                raise BackendError(
                    f"signature {side} {spec.name!r} is not in the model; it has {sorted(declared)}"
                )
            if arg.type != ORT_TYPE_NAMES[spec.datatype]:
                raise BackendError(
                    f"signature {side} {spec.name!r} is {spec.datatype}, the model's is {arg.type}"
                )
            if len(arg.shape) != len(spec.shape):
                raise BackendError(
                    f"signature {side} {spec.name!r} has rank {len(spec.shape)}, "
                    f"the model's has rank {len(arg.shape)}"
                )


def _model_error(exc: BaseException) -> ModelCallFailed:
    error = model_call_failed(exc)
    if not isinstance(error, InputRejected) and _ORT_INPUT_FAULTS.search(str(error)):
        return InputRejected(str(error))
    return error
