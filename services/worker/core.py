"""The worker core: loads the versions it serves, warms them up, runs batches off the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from services.mesh.domain import tracing
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import InternalError, InvalidInput, ModelFailed, Unavailable
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchResult, ModelVersion
from services.worker.backends.base import (
    Backend,
    BackendError,
    InputRejected,
    ModelCallFailed,
    model_call_failed,
)
from services.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

BackendFactory = Callable[[ModelVersion], Backend]


class ArtifactSource(Protocol):
    """Where the worker gets a version's artifact: `services.worker.artifacts.ArtifactCache`."""

    async def fetch(self, spec: ModelVersion) -> Path:
        """A local path to the verified artifact of `spec`."""
        ...


class Worker:
    """Serves the versions its selectors name: `model` (every version), `model/version`, `*`."""

    key = "local"

    def __init__(
        self, catalog: ModelCatalog, *, models: tuple[str, ...], artifacts: ArtifactSource,
        backend_factory: BackendFactory, metrics: WorkerMetrics | None = None,
    ) -> None:
        self._catalog = catalog
        self._models = models
        self._artifacts = artifacts
        self._factory = backend_factory
        self._metrics = metrics or WorkerMetrics()
        self._backends: dict[tuple[str, str], Backend] = {}
        self._loading: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._failed: set[tuple[str, str, str]] = set()
        self._listeners: list[Callable[[], None]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")

    def start(self) -> None:
        """Load what the catalog lists now and whatever it lists later."""
        self._catalog.config.subscribe(self._reconcile)
        self._reconcile()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever the set of ready versions changes."""
        self._listeners.append(listener)

    def ready_versions(self) -> list[str]:
        """`model/version` of every loaded, warmed-up version."""
        return sorted(f"{m}/{v}" for m, v in self._backends)

    def is_ready(self, model: str, version: str) -> bool:
        """Whether (model, version) is loaded and warm here."""
        return (model, version) in self._backends

    def serves(self, model: str, version: str) -> bool:
        """Whether a selector names this version (`*`, the model, or `model/version`)."""
        selectors = self._models
        return "*" in selectors or model in selectors or f"{model}/{version}" in selectors

    def _reconcile(self) -> None:
        for model in self._catalog.models():
            for spec in self._catalog.versions(model):
                if not self.serves(spec.model, spec.version):
                    continue
                key = (spec.model, spec.version)
                if key in self._backends or key in self._loading:
                    continue
                if (spec.model, spec.version, spec.sha256) in self._failed:
                    continue
                task = asyncio.create_task(self._load(spec), name=f"load-{model}/{spec.version}")
                self._loading[key] = task

    async def _load(self, spec: ModelVersion) -> None:
        key = (spec.model, spec.version)
        try:
            started = time.perf_counter()
            path = await self._artifacts.fetch(spec)
            backend = self._factory(spec)
            await asyncio.to_thread(backend.load, path)
            # Warm up in the inference thread itself: torch's per-thread state (OpenMP team,
            # allocator caches) is then ready for the first real batch.
            await asyncio.get_running_loop().run_in_executor(
                self._executor, backend.warm_up, spec.batching.max_batch_size
            )
            self._backends[key] = backend
            log.info("loaded %s/%s on %s in %.2fs", *key, backend.device,
                     time.perf_counter() - started)
        except Exception as exc:
            self._failed.add((spec.model, spec.version, spec.sha256))
            log.error("cannot serve %s/%s: %s", spec.model, spec.version, exc)
        finally:
            self._loading.pop(key, None)
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    async def run_batch(self, batch: Batch, *, timeout: float | None = None) -> BatchResult:
        """Run one batch on its version's backend in the inference thread (one span, a child
        of the batch's span)."""
        span = tracing.start("worker.compute", batch.trace)
        span.set("infermesh.model", batch.model)
        span.set("infermesh.version", batch.version)
        span.set("infermesh.batch_size", sum(batch.rows))
        try:
            result = await self._run_batch(batch)
        except BaseException as exc:
            span.end(exc)
            raise
        span.set("infermesh.device", result.device)
        span.end()
        return result

    async def _run_batch(self, batch: Batch) -> BatchResult:
        backend = self._backends.get((batch.model, batch.version))
        if backend is None:
            raise Unavailable(f"{batch.model}/{batch.version} is not loaded on this worker")
        inputs = {tensor.name: tensor.array() for tensor in batch.inputs}
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, backend.run_batch, inputs
            )
        except Exception as exc:
            raise _batch_error(batch, exc) from exc
        self._metrics.observe(batch, backend.device, time.perf_counter() - started)
        wanted = None if batch.outputs is None else set(batch.outputs)
        return BatchResult(
            [Tensor.from_array(name, array) for name, array in outputs.items()
             if wanted is None or name in wanted],  # nobody asked for the others: no copy back
            device=backend.device,
        )

    async def aclose(self) -> None:
        """Stop loading, unload every version, stop the inference thread."""
        for task in list(self._loading.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        for backend in self._backends.values():
            await asyncio.to_thread(backend.unload)
        self._backends.clear()


def _batch_error(batch: Batch, exc: Exception) -> InternalError | InvalidInput:
    """What a caller is told when running `batch` raised `exc`: the model's error line only,
    no traceback or path (the whole traceback goes to the log)."""
    log.warning("%s/%s failed on a batch of %d rows", batch.model, batch.version,
                sum(batch.rows), exc_info=exc)
    if not isinstance(exc, BackendError):  # another backend's raw error: never its text as is
        exc = model_call_failed(exc)
    if isinstance(exc, InputRejected):
        return InvalidInput(f"the model rejected the input: {exc}")
    if isinstance(exc, ModelCallFailed):
        return ModelFailed(f"the model failed: {exc}")
    return InternalError(f"model {batch.model} version {batch.version} failed: {exc}")
