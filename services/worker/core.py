"""The worker core: loads the versions it serves, warms them up, runs batches off the loop
(a model quick enough, on the loop when asked: `INLINE_BELOW_S`).

Within a memory budget (services/worker/placement.py decides, docs/PLACEMENT.md explains):
versions that fit load at start; the others are published as loadable and load on their
first batch, one load at a time, evicting idle versions to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from services.mesh.domain import tracing
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import DeadlineExceeded, Unavailable
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchResult, ModelVersion
from services.mesh.infra.failpoints import armed, failpoint
from services.worker import memory
from services.worker.backends.base import Backend, DeviceUnavailable, cuda_failure
from services.worker.failures import batch_error, cuda_refusal
from services.worker.inference_thread import InferenceThread
from services.worker.metrics import WorkerMetrics
from services.worker.placement import Key, Placement
from services.worker.residency import Residency

log = logging.getLogger(__name__)

BackendFactory = Callable[[ModelVersion], Backend]
UNLIMITED = 1 << 62  # no budget: every version fits

INLINE_BELOW_S = 0.00025
"""The threshold that pays, when a worker is told to run quick batches on its event loop
(`Worker(inline_below=...)`, setting `INFERMESH_WORKER_INLINE_BELOW_MS`; off by default, since
the architecture runs batches off the event loop): a CPU version whose largest warm-up batch
runs (at its fastest) in less than this then runs its batches on the loop itself, as a plain
server does, instead of in the inference thread.

Handing a batch to the thread and its result back costs two cross-thread wake-ups (a lock and
the loop's self-pipe), and with them the GIL changing hands: for the mlp (~50 µs a batch) at
one request in flight that was ~100 µs of the worker's ~550 µs of CPU a request, and fused
mode's p50 fell 15 % without it (docs/PERFORMANCE.md). Blocking the loop for under a quarter
of a millisecond costs less than the hand-off. Backends that measure it say so with
`fastest_batch_s` (TorchScript and ONNX Runtime); a remote backend (Triton) never runs inline."""


class ArtifactSource(Protocol):
    """Where the worker gets a version's artifact: `services.worker.artifacts.ArtifactCache`."""

    async def fetch(self, spec: ModelVersion) -> Path:
        """A local path to the verified artifact of `spec`."""
        ...


class Worker:
    """Serves the versions its selectors name: `model` (every version not registered
    `dedicated`), `model/version`, `*`."""

    key = "local"

    def __init__(
        self, catalog: ModelCatalog, *, models: tuple[str, ...], artifacts: ArtifactSource,
        backend_factory: BackendFactory, metrics: WorkerMetrics | None = None,
        budget_bytes: int | None = None, thrash_window: float = 60.0,
        inline_below: float = 0.0,
    ) -> None:
        """`budget_bytes`: what loaded versions may hold together (None: no limit, every
        version loads at start); `thrash_window`: seconds after an eviction within which
        a request for that version counts as a thrash; `inline_below`: seconds, see
        INLINE_BELOW_S (0, the default: every batch in the inference thread)."""
        self.inline_below = inline_below
        self._catalog = catalog
        self._models = models
        self._artifacts = artifacts
        self._factory = backend_factory
        self._metrics = metrics or WorkerMetrics()
        self._warmup: dict[tuple[str, str], _Warmup] = {}
        self._rewarming: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._loading: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._failed: set[tuple[str, str, str]] = set()
        self._specs: dict[tuple[str, str], ModelVersion] = {}
        self._fallbacks: dict[tuple[str, str], str] = {}
        self._refusals: dict[tuple[str, str], str] = {}
        self._moving: dict[tuple[str, str], asyncio.Task[Backend]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._executor = InferenceThread("infer")
        self._budget = budget_bytes
        self._residency = Residency(
            Placement(budget_bytes or UNLIMITED, thrash_window=thrash_window), self._metrics,
            executor=self._executor, notify=self._notify,
        )
        self._backends = self._residency.backends  # loaded and warm
        self._loadable = self._residency.loadable  # served, loaded on a first batch

    def start(self) -> None:
        """Load what the catalog lists now and whatever it lists later."""
        self._residency.start()
        if self._budget is not None:
            self._metrics.placement.budget_bytes.set(self._budget)
        self._catalog.config.subscribe(self._reconcile)
        self._reconcile()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever the set of ready versions changes."""
        self._listeners.append(listener)

    def ready_versions(self) -> list[str]:
        """`model/version` of every version this worker serves now: loaded and warm, or
        loadable (beyond the budget: its first batch waits for its load)."""
        return sorted(f"{m}/{v}" for m, v in self._backends.keys() | self._loadable)

    def resident_versions(self) -> list[str]:
        """`model/version` of every loaded, warmed-up version (no load before a batch)."""
        return sorted(f"{m}/{v}" for m, v in self._backends)

    def is_resident(self, model: str, version: str) -> bool:
        """Whether (model, version) is loaded and warm here (its batches wait for no load)."""
        return (model, version) in self._backends

    def is_ready(self, model: str, version: str) -> bool:
        """Whether (model, version) is served here: loaded, or loadable on its first batch."""
        return (model, version) in self._backends or (model, version) in self._loadable

    @property
    def placement(self) -> Placement:
        """Resident versions, their measured bytes and the budget (read-only use)."""
        return self._residency.placement

    def warmup_timings(self, model: str, version: str) -> dict[int, float]:
        """Seconds a batch of each size (rows) took in the warm-up of (model, version) here,
        for the batcher's latency model; empty when not loaded."""
        warmup = self._warmup.get((model, version))
        return {} if warmup is None else dict(warmup.seconds)

    def warmup_records(self) -> dict[str, dict[str, float]]:
        """Every ready version's warm-up timings as published in the endpoint record:
        `{"model/version": {"rows": seconds}}`."""
        return {
            f"{m}/{v}": {str(rows): seconds for rows, seconds in warmup.seconds.items()}
            for (m, v), warmup in sorted(self._warmup.items()) if self.is_ready(m, v)
        }

    def fallbacks(self) -> dict[str, str]:
        """`{"model/version": reason}` of every version serving from CPU because CUDA failed
        it (its `cpu_fallback`), as published in the endpoint record; cleared by a reload."""
        return {f"{m}/{v}": reason for (m, v), reason in sorted(self._fallbacks.items())}

    def serves(self, spec: ModelVersion) -> bool:
        """Whether a selector names this version: `*`, `model/version`, or the model unless
        the version is `dedicated` (its own workers name it by `model/version`)."""
        selectors = self._models
        if "*" in selectors or f"{spec.model}/{spec.version}" in selectors:
            return True
        return spec.model in selectors and spec.worker != "dedicated"

    def _reconcile(self) -> None:
        for model in self._catalog.models():
            for spec in self._catalog.versions(model):
                if not self.serves(spec):
                    continue
                key = (spec.model, spec.version)
                if key in self._backends:
                    self._rewarm_if_bigger(spec)
                    continue
                if key in self._loadable:
                    self._specs[key] = spec  # its next load takes the newest record
                    continue
                if key in self._loading:
                    continue
                if (spec.model, spec.version, spec.sha256) in self._failed:
                    continue
                self._loading[key] = asyncio.create_task(
                    self._load(spec, on_demand=False), name=f"load-{model}/{spec.version}")

    async def _load(self, spec: ModelVersion, *, on_demand: bool) -> None:
        """Load `spec` (one load at a time per worker): at start only if it fits beside the
        resident versions (else it becomes loadable); on demand, evicting to make room."""
        key = (spec.model, spec.version)
        placement = self._residency.placement
        try:
            async with self._residency.lock:
                path = await self._artifacts.fetch(spec)
                artifact_bytes = await asyncio.to_thread(memory.file_bytes, path)
                need = placement.estimate(key, artifact_bytes=artifact_bytes)
                self._specs[key] = spec
                if on_demand:
                    await self._residency.make_room(key, need)
                if on_demand or placement.fits(need):
                    await self._load_measured(spec, path, artifact_bytes)
                else:
                    self._residency.defer(key)
                    log.info("%s/%s loads on its first batch (needs about %d bytes, beyond "
                             "the budget)", *key, need)
        except Exception as exc:
            # Not retried until the record changes: a refusal is logged once, no load loop.
            self._failed.add((spec.model, spec.version, spec.sha256))
            self._residency.forget(key)
            if isinstance(exc, DeviceUnavailable):
                self._refusals[key] = str(exc)
            log.error("cannot serve %s/%s: %s", spec.model, spec.version, exc)
        finally:
            self._loading.pop(key, None)
        self._notify()

    async def _load_measured(self, spec: ModelVersion, path: Path, artifact_bytes: int) -> None:
        """Load and warm up `spec`, then note what it holds: the measured growth, at least
        its artifact's bytes (another batch freeing memory meanwhile can hide some)."""
        key = (spec.model, spec.version)
        before = await asyncio.to_thread(memory.snapshot)  # after any eviction for room
        started = time.perf_counter()
        self._fallbacks.pop(key, None)  # every load tries the policy's device again
        self._refusals.pop(key, None)
        backend = await self._start(spec, path)
        after = await asyncio.to_thread(memory.snapshot)
        seconds = time.perf_counter() - started
        size = max(memory.footprint(before, after, backend.device), artifact_bytes)
        self._metrics.serving_on(*key, backend.device)
        # The warm-up's thread decision is in the log: a model decided onto two threads
        # under contention spins a core for as long as it serves (docs/PERFORMANCE.md).
        log.info("loaded %s/%s on %s in %.2fs (%d bytes; %s intra-op threads, largest warm-up "
                 "batch %.3f ms at its fastest)", *key, backend.device, seconds, size,
                 getattr(backend, "intra_op_threads", "?"),
                 1000 * getattr(backend, "fastest_batch_s", float("nan")))
        await self._residency.admit(key, backend, footprint=size, seconds=seconds)

    async def _resident(self, key: Key, deadline: float | None) -> Backend:
        """The backend of `key`, loading it first when it is loadable (the wait bounded by
        `deadline`; the load goes on past it). Unavailable when not served here."""
        while (backend := self._backends.get(key)) is None:
            task = self._loading.get(key)
            if task is None:
                if key not in self._loadable:
                    refusal = self._refusals.get(key)
                    raise Unavailable(f"{key[0]}/{key[1]} is not loaded on this worker"
                                      + (f": {refusal}" if refusal else ""))
                task = asyncio.create_task(self._load(self._specs[key], on_demand=True),
                                           name=f"load-{key[0]}/{key[1]}")
                self._loading[key] = task
            remaining = None if deadline is None else deadline - time.time()
            try:
                await asyncio.wait_for(asyncio.shield(task), remaining)
            except TimeoutError:
                raise _Expired from None
        return backend

    async def _start(self, spec: ModelVersion, path: Path) -> Backend:
        """`spec` loaded and warm on its policy's device, or on CPU when CUDA fails it and
        its `cpu_fallback` allows; DeviceUnavailable naming both when it does not."""
        try:
            backend = await self._load_on(spec, path)
        except Exception as exc:
            failure = cuda_failure(exc) if spec.device != "cpu" else None
            if failure is None:
                raise
            if not spec.cpu_fallback:
                raise DeviceUnavailable(cuda_refusal(spec, failure[1])) from exc
            return await self._load_on_cpu(spec, path, failure)
        # A backend that took CPU itself at construction (ONNX's `device_fallback`).
        chosen = getattr(backend, "device_fallback", None)
        if isinstance(chosen, str):
            self._note_fallback(spec, ("cuda_unavailable", chosen))
        return backend

    async def _load_on(self, spec: ModelVersion, path: Path) -> Backend:
        backend = self._factory(spec)
        top = spec.batching.max_batch_size
        try:
            await asyncio.to_thread(backend.load, path)
            # Warm up in the inference thread itself: torch's per-thread state (OpenMP team,
            # allocator caches) is then ready for the first real batch.
            seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._warm_up, backend, top
            )
        except BaseException:
            await asyncio.to_thread(backend.unload)  # give back what a failed load holds
            raise
        self._warmup[(spec.model, spec.version)] = _Warmup(top, seconds)
        return backend

    async def _load_on_cpu(
        self, spec: ModelVersion, path: Path, failure: tuple[str, str]
    ) -> Backend:
        backend = await self._load_on(replace(spec, device="cpu"), path)
        self._note_fallback(spec, failure)
        return backend

    def _note_fallback(self, spec: ModelVersion, failure: tuple[str, str]) -> None:
        kind, reason = failure
        log.warning("%s/%s cannot run on CUDA (%s): serving it from CPU (cpu_fallback)",
                    spec.model, spec.version, reason)
        self._metrics.fell_back(spec.model, spec.version, kind)
        self._fallbacks[(spec.model, spec.version)] = reason

    async def _fall_back(
        self, key: tuple[str, str], backend: Backend, exc: Exception
    ) -> Backend | None:
        """The backend to run a batch on again after `backend` raised `exc` on it: the CPU
        one when that was CUDA failing and the version may fall back (one move however many
        batches fail at once), None when the error stands."""
        current = self._backends.get(key)
        if current is not None and current is not backend:
            return current  # another batch's failure moved it already
        spec = self._specs.get(key)
        failure = cuda_failure(exc) if backend.device.startswith("cuda") else None
        if spec is None or failure is None or not spec.cpu_fallback:
            return None
        task = self._moving.get(key)
        if task is None:
            task = asyncio.create_task(self._move(spec, backend, failure), name=f"to-cpu-{key}")
            self._moving[key] = task
        return await asyncio.shield(task)

    async def _move(
        self, spec: ModelVersion, old: Backend, failure: tuple[str, str]
    ) -> Backend:
        key = (spec.model, spec.version)
        try:
            path = await self._artifacts.fetch(spec)
            backend = await self._load_on_cpu(spec, path, failure)
            self._backends[key] = backend
            self._metrics.serving_on(*key, backend.device)
            # In the inference thread, after any batch already queued on the old backend.
            await asyncio.get_running_loop().run_in_executor(self._executor, old.unload)
        finally:
            self._moving.pop(key, None)
        self._notify()
        return backend

    def _warm_up(self, backend: Backend, top: int) -> dict[int, float]:
        """A backend's warm-up sweep, in the inference thread, letting the batches queued
        meanwhile run between its steps (`services.worker.inference_thread`)."""
        with self._executor.yielding():
            return backend.warm_up(top)

    def _rewarm_if_bigger(self, spec: ModelVersion) -> None:
        """A version's max_batch_size grew (the registry changed its queue policy): sweep the
        new sizes in the background while it keeps serving, then republish the timings.

        The sweep shares the inference thread (batches arriving meanwhile run between its
        steps); without it the first batches of each new size would pay the JIT's stall.
        """
        key = (spec.model, spec.version)
        warmed = self._warmup.get(key)
        top = spec.batching.max_batch_size
        if warmed is None or top <= warmed.max_batch_size or key in self._rewarming:
            return
        task = asyncio.create_task(self._rewarm(key, top), name=f"rewarm-{key[0]}/{key[1]}")
        self._rewarming[key] = task

    async def _rewarm(self, key: tuple[str, str], top: int) -> None:
        try:
            seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._warm_up, self._backends[key], top
            )
            self._warmup[key] = _Warmup(top, seconds)
            log.info("re-warmed %s/%s up to batches of %d", *key, top)
        except Exception as exc:  # still serving: the old sizes stay warm
            log.warning("re-warm-up of %s/%s failed: %s", *key, exc)
        finally:
            self._rewarming.pop(key, None)
        self._notify()
        self._reconcile()  # grown again meanwhile?

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    async def run_batch(self, batch: Batch, *, timeout: float | None = None) -> BatchResult:
        """Run one batch on its version's backend in the inference thread, or on the loop for
        a quick model when asked (`INLINE_BELOW_S`); one span, a child of the batch's span.

        A batch whose deadline (`batch.deadline`, else `timeout` seconds from now) passes
        before the inference thread starts it is dropped unrun with DeadlineExceeded: nobody
        waits for its rows any more.
        """
        deadline = batch.deadline
        if deadline is None and timeout is not None:
            deadline = time.time() + timeout
        span = tracing.start("worker.compute", batch.trace)
        span.set("infermesh.model", batch.model)
        span.set("infermesh.version", batch.version)
        span.set("infermesh.batch_size", sum(batch.rows))
        try:
            result = await self._run_batch(batch, deadline)
        except BaseException as exc:
            span.end(exc)
            raise
        span.set("infermesh.device", result.device)
        span.end()
        return result

    async def _run_batch(self, batch: Batch, deadline: float | None) -> BatchResult:
        key = (batch.model, batch.version)
        self._residency.begin(key)  # queued here from now on: never evicted
        try:
            return await self._run_resident(batch, key, deadline)
        finally:
            self._residency.end(key)

    async def _run_resident(
        self, batch: Batch, key: Key, deadline: float | None
    ) -> BatchResult:
        try:
            backend = await self._resident(key, deadline)
        except _Expired:
            self._metrics.expired(batch)
            raise DeadlineExceeded(f"deadline exceeded while {batch.model}/{batch.version} "
                                   "was loading on the worker (the load goes on)") from None
        inputs = {tensor.name: tensor.array() for tensor in batch.inputs}
        try:
            backend, (outputs, seconds) = await self._execute(key, backend, inputs, deadline)
        except _Expired:
            self._metrics.expired(batch)
            raise DeadlineExceeded(
                f"deadline exceeded before the worker could start a batch of {batch.model}"
            ) from None
        except Exception as exc:
            log.warning("%s/%s failed on a batch of %d rows", batch.model, batch.version,
                        sum(batch.rows), exc_info=exc)
            raise batch_error(batch, exc) from exc
        self._metrics.observe(batch, backend.device, seconds)
        wanted = None if batch.outputs is None else set(batch.outputs)
        return BatchResult(
            [Tensor.from_array(name, array) for name, array in outputs.items()
             if wanted is None or name in wanted],  # nobody asked for the others: no copy back
            device=backend.device,
        )

    async def _execute(
        self, key: tuple[str, str], backend: Backend, inputs: dict[str, Any],
        deadline: float | None,
    ) -> tuple[Backend, _Ran]:
        """Run a batch in the inference thread; a CUDA failure that moves the version to CPU
        runs it again there. Returns the backend that ran it, and the outputs with the seconds
        the run took."""
        loop = asyncio.get_running_loop()
        try:
            if self._runs_inline(key, backend):
                return backend, _run_if_due(backend, inputs, deadline)
            # What run_in_executor does, less its per-call coroutine-function check.
            return backend, await asyncio.wrap_future(
                self._executor.submit(_run_if_due, backend, inputs, deadline), loop=loop
            )
        except _Expired:
            raise
        except Exception as exc:
            moved = await self._fall_back(key, backend, exc)
            if moved is None:
                raise
        return moved, await loop.run_in_executor(
            self._executor, _run_if_due, moved, inputs, deadline
        )

    def _runs_inline(self, key: Key, backend: Backend) -> bool:
        """Whether a batch of `key` runs on the event loop (INLINE_BELOW_S): a CPU backend
        quick enough, not being re-warmed in the inference thread meanwhile (a backend is
        called from one thread at a time), and no failpoint that would stall the loop."""
        fastest = getattr(backend, "fastest_batch_s", None)
        return (isinstance(fastest, float) and fastest < self.inline_below
                and backend.device == "cpu" and key not in self._rewarming
                and not armed("worker.run_batch"))

    async def aclose(self) -> None:
        """Stop loading, unload every version, stop the inference thread."""
        tasks = [*self._loading.values(), *self._rewarming.values(), *self._moving.values()]
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        await self._residency.aclose()


class _Expired(Exception):
    """The batch's deadline passed before the inference thread got to it."""


_Ran = tuple[dict[str, Any], float]
"""A batch's outputs, and the seconds its run took."""


def _run_if_due(backend: Backend, inputs: dict[str, Any], deadline: float | None) -> _Ran:
    """`backend.run_batch(inputs)` in the inference thread, unless the deadline passed while
    the batch waited for the thread (behind another batch); then _Expired. The seconds are
    the run's alone, timed where it runs: the compute histograms are the model's time, not
    the wait for the thread."""
    if deadline is not None and time.time() >= deadline:
        raise _Expired
    started = time.perf_counter()
    failpoint("worker.run_batch")  # `sleep:<ms>` models a slow model in the tests and bench
    outputs = backend.run_batch(inputs)
    return outputs, time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class _Warmup:
    """What a version's warm-up swept: sizes up to `max_batch_size`, seconds per size."""

    max_batch_size: int
    seconds: Mapping[int, float]
