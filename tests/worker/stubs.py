"""Stand-ins the worker tests share: an artifact store for backends that load nothing, and
a worker over one stub backend, started and ready."""

from __future__ import annotations

import asyncio
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
