"""Which versions a worker holds loaded, which it could load, and making room for a load.

The worker core (services/worker/core.py) loads backends; this keeps them, with the
placement policy (services/worker/placement.py) deciding what fits and what to evict. It
counts each version's batches queued or running here, so a version with work is never
evicted, and wakes a load waiting for room when one finishes. One load runs at a time
(`lock`): a storm of first batches for cold versions loads them one after another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from services.worker import memory
from services.worker.backends.base import Backend
from services.worker.metrics import WorkerMetrics
from services.worker.placement import Key, Placement

log = logging.getLogger(__name__)


class Residency:
    """The resident backends of one worker and its loadable versions, within its budget."""

    def __init__(
        self, placement: Placement, metrics: WorkerMetrics, *, executor: Executor,
        notify: Callable[[], None],
    ) -> None:
        self.placement = placement
        self.backends: dict[Key, Backend] = {}
        self.loadable: set[Key] = set()  # served here, not resident: loads on its first batch
        self._metrics = metrics
        self._executor = executor
        self._notify = notify
        self._lock: asyncio.Lock | None = None
        self._freed: asyncio.Event | None = None  # a batch finished: a version may be evictable

    def start(self) -> None:
        self._lock, self._freed = asyncio.Lock(), asyncio.Event()

    @property
    def lock(self) -> asyncio.Lock:
        """Held for the whole of a load, so loads run one at a time."""
        assert self._lock is not None, "start() first"
        return self._lock

    def served(self, key: Key) -> bool:
        return key in self.backends or key in self.loadable

    def begin(self, key: Key) -> None:
        """A batch of `key` arrived: note the request (counting a thrash) and hold `key`
        resident until :meth:`end`."""
        if self.served(key) and self.placement.requested(key):
            self._metrics.placement.thrashed(*key)
        self.placement.started(key)

    def end(self, key: Key) -> None:
        self.placement.finished(key)
        if self._freed is not None:
            self._freed.set()

    def defer(self, key: Key) -> None:
        """`key` does not fit now: served, loaded on its first batch."""
        self.loadable.add(key)

    async def admit(self, key: Key, backend: Backend, *, footprint: int, seconds: float) -> None:
        """`backend` of `key` is loaded and warm, holding `footprint` bytes (measured); evict
        back under the budget when it measured above the estimate and anything is idle."""
        self.backends[key] = backend
        self.loadable.discard(key)
        self.placement.loaded(key, footprint=footprint, load_seconds=seconds)
        self._metrics.placement.loaded(*key, footprint=footprint, seconds=seconds,
                                       total=self.placement.resident_bytes)
        for victim in self.placement.victims(footprint, keep=key) or ():
            await self.evict(victim)

    async def make_room(self, key: Key, need: int) -> None:
        """Evict until `need` more bytes fit; while only versions with batches could make
        room, wait for batches to finish (a caller's deadline bounds its wait, not this)."""
        assert self._freed is not None, "start() first"
        while (victims := self.placement.victims(need, keep=key)) is None:
            self._freed.clear()
            await self._freed.wait()
        for victim in victims:
            await self.evict(victim)

    async def evict(self, key: Key) -> None:
        """Unload `key` (idle: chosen by the placement); it stays served, as loadable."""
        backend = self.backends.pop(key)
        self.loadable.add(key)
        self.placement.evicted(key)
        self._metrics.serving_on(*key, None)
        self._metrics.placement.unloaded(*key, total=self.placement.resident_bytes,
                                         evicted=True)
        log.info("evicted %s/%s to make room", *key)
        # In the inference thread, where no batch of it waits (it would not have been chosen).
        await asyncio.get_running_loop().run_in_executor(self._executor, backend.unload)
        await asyncio.to_thread(memory.release_freed)
        self._notify()

    def forget(self, key: Key) -> None:
        """`key` failed to load: no longer served here."""
        self.loadable.discard(key)

    async def aclose(self) -> None:
        """Unload every resident version (the inference thread has stopped)."""
        for key, backend in self.backends.items():
            await asyncio.to_thread(backend.unload)
            self.placement.forget(key)
        self.backends.clear()
