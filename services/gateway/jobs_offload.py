"""Parsing and checking large job bodies in a separate process, so the gateway's event loop
keeps serving realtime requests meanwhile.

Why a process and not a thread: a 28 MB `POST /v1/jobs` costs ~0.8 s in one `orjson.loads`
call and ~3 s of per-row Python (`decode_infer`, `validate_request`, `orjson.dumps`), and both
hold the GIL; in a thread they would stall the loop just the same. In a child process the loop
only reads the body and hands it over (pickling happens on the pool's own threads), and gets the
encoded rows back.

Why lazily: the pool (one spawned process by default) is created on the first body above
`max_inline_bytes`, never at gateway start, so the gateway starts as fast as before and small
jobs never pay for it; small bodies run inline, where a process hop would cost more than the
work. Creating the pool and starting its process happen on a thread too (both write to pipes).

A child that dies (killed, out of memory) breaks the pool: that call answers Unavailable
(503 with Retry-After) and the next call starts a new pool. The functions run in the child are
module-level and pure (jobs_submission.py, jobs_inputs.py); InvalidInput raised there pickles
back as itself, message and all.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from services.mesh.domain.errors import Unavailable

T = TypeVar("T")

DEFAULT_MAX_INLINE_BYTES = 256 << 10
RETRY_AFTER_S = 1.0


class Offload:
    """Runs a pure function inline for a small input and in a child process for a large one."""

    def __init__(
        self, *, max_inline_bytes: int | None = DEFAULT_MAX_INLINE_BYTES, processes: int = 1
    ) -> None:
        """`max_inline_bytes`: inputs up to this size run inline (None: every input does,
        and no process is ever started)."""
        self._max_inline_bytes = max_inline_bytes
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def offloads(self, size: int) -> bool:
        """Whether an input of `size` bytes runs in the child process."""
        return self._max_inline_bytes is not None and size > self._max_inline_bytes

    async def run(self, fn: Callable[..., T], *args: Any, size: int) -> T:
        """`fn(*args)`, in the child process when `size` (the input's bytes) is large;
        Unavailable when the child died or this is closed."""
        if not self.offloads(size):
            return fn(*args)
        if self._closed:
            raise Unavailable("job parsing: the gateway is shutting down",
                              retry_after=RETRY_AFTER_S)
        try:
            pool, future = await asyncio.to_thread(self._submit, fn, args)
        except BrokenProcessPool:
            raise _died() from None
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            await asyncio.to_thread(self._drop, pool)
            raise _died() from None

    def _submit(
        self, fn: Callable[..., T], args: tuple[Any, ...]
    ) -> tuple[ProcessPoolExecutor, Future[T]]:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self._processes, mp_context=context)
            pool = self._pool
        try:
            return pool, pool.submit(fn, *args)
        except BrokenProcessPool:
            self._drop(pool)
            raise

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        """Forget a broken pool, unless already replaced, so the next call starts a new one."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        """Stop the child process, if one was started; later large calls are refused."""
        self._closed = True
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


def _died() -> Unavailable:
    return Unavailable("job parsing: the gateway's parsing process died; retry",
                       retry_after=RETRY_AFTER_S)
