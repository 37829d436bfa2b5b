"""The worker's inference thread: one thread runs every model call, in order, and a long call
may let the calls queued behind it run in between its own steps.

Why not `ThreadPoolExecutor(max_workers=1)`: a version's load ends with a warm-up sweep (every
batch size, four times over: seconds for an encoder on two CPUs) in this same thread, since
torch's per-thread state must be ready for the first real batch. Run as one call, the sweep
held up every batch of every version already serving here until it ended, so a hit's p99
rose tenfold while other versions loaded. With `between_steps`, the sweep runs the batches
queued meanwhile after each of its dummy batches: a batch now waits for at most one step of a
warm-up, and the warm-up's own timings (each step timed alone) are unchanged.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]

_local = threading.local()


def between_steps() -> None:
    """Called by a long call (a warm-up sweep) between its steps, in the thread running it:
    runs the calls queued behind it there and then, when that thread is an InferenceThread
    that allows it (see `InferenceThread.yielding`); otherwise does nothing."""
    run: Callable[[], None] | None = getattr(_local, "run_queued", None)
    if run is not None:
        run()


class InferenceThread(Executor):
    """A single-thread executor (for `loop.run_in_executor`) whose long calls may yield."""

    def __init__(self, name: str = "infer") -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    @contextlib.contextmanager
    def yielding(self) -> Iterator[None]:
        """Inside this thread: while the block runs, `between_steps()` runs queued calls (not
        nested: a call run that way does not yield in turn)."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("yielding() belongs inside the inference thread")
        _local.run_queued = self._run_queued
        try:
            yield
        finally:
            _local.run_queued = None

    def _serve(self) -> None:
        while (call := self._queue.get()) is not None:
            _run(call)

    def _run_queued(self) -> None:
        _local.run_queued = None  # a call run here does not yield in turn
        try:
            while True:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    return
                if call is None:  # shut down: the serving loop must see it too
                    self._queue.put(None)
                    return
                _run(call)
        finally:
            _local.run_queued = self._run_queued


def _run(call: _Call) -> None:
    future, fn, args, kwargs = call
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # handed to the awaiting coroutine, as the stdlib does
        future.set_exception(exc)
    else:
        future.set_result(result)
