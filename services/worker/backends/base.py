"""The backend interface a worker drives, and the errors backends raise.

A backend turns one concatenated batch of numpy arrays into outputs. Its methods are
synchronous: the worker core calls them in a thread, off the event loop.

A signature is the plain dict stored in etcd, e.g.::

    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}],
     "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}]}

Datatypes are Open Inference Protocol names, -1 marks a dynamic dim and the first dim is
the batch dim.

Errors::

    BackendError            the model could not be loaded or run
     ├── DeviceUnavailable  the device policy asks for hardware this host lacks
     │                      (:func:`cuda_failure` tells CUDA's own failures from the model's)
     └── ModelCallFailed    the model itself raised on a batch (message sanitised)
          └── InputRejected the model raised because of the batch's input (an index out of range)

A model's own exception text can carry a TorchScript traceback with the server's file paths;
:func:`model_call_failed` keeps one meaningful line of it, so it is safe to send to a caller.
The full exception stays chained (``__cause__``) for the server's log.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from services.worker.inference_thread import between_steps

DEVICE_POLICIES = ("auto", "cuda", "cpu")


class BackendError(Exception):
    """A model could not be loaded, warmed up or run."""


class DeviceUnavailable(BackendError):
    """The device policy requires hardware (CUDA) that this host does not have."""


class ModelCallFailed(BackendError):
    """The model raised while running a batch; the message is one sanitised line."""


class InputRejected(ModelCallFailed):
    """The model raised because of the batch's input, e.g. a token id past the vocabulary."""


# Errors that name the input as the cause: an index (a token id, a gather position) outside
# the table it indexes. Anything else the model raises is the model's failure.
_INPUT_FAULTS = re.compile(
    r"index (-?\d+ )?(is )?out of (range|bounds)|out of bounds for (axis|dimension)"
    r"|index -?\d+ is out of bounds",
    re.IGNORECASE,
)
# Lines of a (TorchScript) traceback rather than the error itself.
_FRAME_LINE = re.compile(r"^(Traceback|File |The following operation failed|def |~|.*<--- HERE|\s)")
# A file path (two or more separators) or a Python file name.
_PATH = re.compile(r"(?:[A-Za-z]:)?[\w.@+-]*(?:[\\/][\w.@+-]+){2,}[\\/]?|[\w.-]+\.py\b")
_ERROR_NAME = re.compile(r"^\w+(Error|Exception)\b")
_MAX_REASON = 200


def model_call_failed(exc: BaseException) -> ModelCallFailed:
    """The error to raise for the model's own exception `exc`: `InputRejected` when the text
    says an index was out of range, else `ModelCallFailed`; one line, no frames, no paths."""
    reason = sanitised_reason(exc)
    cls = InputRejected if _INPUT_FAULTS.search(reason) else ModelCallFailed
    return cls(reason)


def sanitised_reason(exc: BaseException) -> str:
    """The meaningful line of `exc`'s message (TorchScript puts it last, after the frames),
    with anything path-like replaced, named by its type, at most 200 characters."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    kept = [line.strip() for line in lines if not _FRAME_LINE.match(line)]
    line = (kept[-1] if len(kept) < len(lines) else kept[0]) if kept else ""
    line = _PATH.sub("<path>", line)
    if not _ERROR_NAME.match(line):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line[:_MAX_REASON]


# What CUDA says when it, not the model, failed: out of memory, a lost or absent device, a
# driver or library error. Checked only on a version whose device is CUDA.
_CUDA_OOM = re.compile(r"(CUDA|GPU|device)\b.*out of memory|out of memory.*\b(CUDA|GPU|device)",
                       re.IGNORECASE)
_CUDA_FAULTS = re.compile(
    r"CUDA error|CUDA driver|no CUDA GPUs|NVIDIA driver|CUDNN_STATUS|CUBLAS_STATUS|cudaError"
    r"|device-side assert|device not ready|unspecified launch failure",
)


def cuda_failure(exc: BaseException) -> tuple[str, str] | None:
    """``(kind, reason)`` when `exc` (or an exception it chains) is CUDA failing rather than
    the model: kind ``cuda_unavailable`` (:class:`DeviceUnavailable`), ``cuda_oom`` or
    ``cuda_error``, reason one sanitised line; None for any other error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DeviceUnavailable):
            return "cuda_unavailable", str(seen)[:_MAX_REASON]
        text = str(seen)
        if type(seen).__name__ == "OutOfMemoryError" or _CUDA_OOM.search(text):
            return "cuda_oom", sanitised_reason(seen)
        if _CUDA_FAULTS.search(text):
            return "cuda_error", sanitised_reason(seen)
        seen = seen.__cause__ or seen.__context__
    return None


class Backend(Protocol):
    """One loaded model on one device; not thread-safe, called from one thread at a time."""

    @property
    def device(self) -> str:
        """The torch device the model runs on, e.g. ``"cpu"`` or ``"cuda:0"``."""
        ...

    def load(self, artifact: Path) -> None:
        """Load the model file at ``artifact`` onto the device."""
        ...

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        """Run dummy batches of sizes up to ``max_batch_size`` so the first request is fast.

        Returns the seconds a batch of each size swept took (rows -> seconds, the median of
        a few runs): the latency model's seed. :func:`timed_sweep` does both.
        """
        ...

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch: inputs keyed by signature input name, concatenated along dim 0.

        Returns outputs keyed by signature output name, rows aligned with the input rows.
        """
        ...

    def unload(self) -> None:
        """Release the model and the device memory it held."""
        ...


UNTIMED_PASSES = 1
TIMED_PASSES = 3


def warmup_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a warm-up sweeps: 1, 2, 3, the powers of two, ``max - 1`` and ``max``
    (enough to seed a latency model linear in rows, and every shape class a JIT meets)."""
    top = max(1, max_batch_size)
    sizes = {1, 2, 3, top - 1, top} | {2**i for i in range(top.bit_length())}
    return sorted(s for s in sizes if 1 <= s <= top)


def timed_sweep(
    run: Callable[[int], None], sizes: list[int], *, clock: Callable[[], float] = time.perf_counter
) -> dict[int, float]:
    """Call ``run(rows)`` for every size, over all sizes once untimed (a JIT specialises
    then) and :data:`TIMED_PASSES` times timed; the median seconds per size. Between runs,
    untimed, the inference thread may run the batches queued behind the sweep
    (`services.worker.inference_thread`)."""
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for sweep in range(UNTIMED_PASSES + TIMED_PASSES):
        for size in sizes:
            started = clock()
            run(size)
            if sweep >= UNTIMED_PASSES:
                times[size].append(clock() - started)
            between_steps()  # batches of the versions serving here go in between
    return {size: statistics.median(runs) for size, runs in times.items() if runs}


FASTEST_OF = 7


def fastest_run(
    run: Callable[[], None], *, runs: int = FASTEST_OF,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """The fastest of `runs` calls of `run`, in seconds of `clock`: what the model costs, not
    what a busy machine made it take. With `clock=time.thread_time` (what backends decide their
    intra-op threads from, on one thread: `single_thread_cost`) a run's wait for a core or
    for the GIL is not counted at all; a wall clock counts it, and under start-up contention
    even the fastest of 7 wall-clock runs of the mlp read 5-9 ms (a teammate thread or the
    GIL held elsewhere), over the 1 ms line, and left it on two threads whose spin-waits then
    cost ~130-300 µs a request."""
    fastest = float("inf")
    for _ in range(runs):
        started = clock()
        run()
        fastest = min(fastest, clock() - started)
        between_steps()
    return fastest


def single_thread_cost(run: Callable[[], None], *,
                       clock: Callable[[], float] = time.thread_time) -> float:
    """The CPU seconds the fastest of `FASTEST_OF` calls of `run` takes in the calling thread,
    for a backend set to one intra-op thread (then all the model's work runs in this thread).
    Backends compare it with their single-thread line: a busy host cannot move it, as it moves
    any wall-clock reading (`fastest_run`)."""
    return fastest_run(run, clock=clock)
