"""Stand-ins the worker tests share: an artifact store for backends that load nothing, and
a worker over one stub backend, started and ready; a thread holding the GIL beside a test."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.types import ModelVersion, Signature
from services.worker.backends.base import Backend
from services.worker.core import Worker
from services.worker.metrics import WorkerMetrics
from tests.fakes import model_records


class NoArtifacts:
    """Artifacts for stub backends, which never read the path they are given."""

    async def fetch(self, spec: ModelVersion) -> Path:
        return Path("/dev/null")


async def ready_worker(backend: Backend, signature: Signature, **options: float) -> Worker:
    """A started worker serving `backend` as version 1 of model `m`, once that is ready
    (`options`: the Worker's float options, e.g. `inline_below`)."""

    def factory(spec: ModelVersion) -> Backend:
        return backend

    worker = Worker(ModelCatalog(StaticConfig(model_records("m", signature))), models=("m",),
                    artifacts=NoArtifacts(), backend_factory=factory, metrics=WorkerMetrics(),
                    **options)  # type: ignore[arg-type]  # only Worker's float options
    ready = asyncio.Event()
    worker.subscribe(lambda: ready.set() if worker.is_ready("m", "1") else None)
    worker.start()
    async with asyncio.timeout(30):
        await ready.wait()
    return worker


class RunClock:
    """A clock under which every timed run takes `seconds`: two reads (start, end) a run.
    As a wall clock, a busy host where every run waits; as a CPU clock, what a model costs."""

    def __init__(self, seconds: float) -> None:
        self._now, self.reads, self._seconds = 0.0, 0, seconds

    def __call__(self) -> float:
        if self.reads % 2:  # the end of a run
            self._now += self._seconds
        self.reads += 1
        return self._now


@contextlib.contextmanager
def gil_held_elsewhere() -> Iterator[None]:
    """A thread spinning in Python beside the test: whenever the test's thread releases the GIL
    (a model's call does) it gets it back only at the next forced switch
    (`sys.getswitchinterval()`, 5 ms), as a worker's inference thread does beside a busy event
    loop while the process starts."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, name="gil-spinner", daemon=True)
    spinner.start()
    try:
        yield
    finally:
        stop.set()
        spinner.join()
