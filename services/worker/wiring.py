"""Building a worker from its settings: `python -m services.worker` and fused mode both call
`build_worker`; the batcher reaches it over a link, or calls the core in-process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import ConfigView
from services.mesh.transport.auth import Credential
from services.worker import memory
from services.worker.app import create_app
from services.worker.artifacts import ArtifactCache
from services.worker.core import Worker
from services.worker.factory import backend_factory
from services.worker.metrics import WorkerMetrics
from services.worker.placement import default_budget
from services.worker.settings import WorkerSettings


@dataclass(frozen=True, slots=True)
class WorkerService:
    """A built, started worker: its core, and the app that serves it to batchers over links."""

    core: Worker
    metrics: WorkerMetrics
    settings: WorkerSettings

    def link_app(self, credential: Credential) -> web.Application:
        """Serve the core over links (`/link`, `/metrics`, `/healthz`) to callers presenting
        `credential`; not in fused mode."""
        return create_app(self.core, self.metrics, credential=credential,
                          max_frame_bytes=self.settings.max_frame_bytes,
                          drain_timeout=self.settings.drain_timeout)


async def build_worker(
    settings: WorkerSettings, stack: contextlib.AsyncExitStack, *, catalog: ModelCatalog,
    session: aiohttp.ClientSession, publish_models: Callable[[list[str]], None],
    registry: CollectorRegistry | None = None,
    publish_warmup: Callable[[dict[str, dict[str, float]]], None] | None = None,
    publish_fallbacks: Callable[[dict[str, str]], None] | None = None,
    publish_resident: Callable[[list[str]], None] | None = None,
) -> WorkerService:
    """The worker per `settings`, downloading artifacts with `session`, its metrics in
    `registry` (its own when None); started, and closed through `stack`.

    `publish_models(ready)` is called with the ready `model/version`s whenever they change,
    from the first load on (to update this worker's endpoint record); `publish_warmup` just
    before it, with the warm-up timings (`Worker.warmup_records`), so a batcher that sees a
    version ready sees its timings too. `publish_fallbacks` likewise, with the versions
    serving from CPU because CUDA failed them (`Worker.fallbacks`), and `publish_resident`
    with the versions loaded now (`Worker.resident_versions`; the ready ones beyond them
    load on their first batch, docs/PLACEMENT.md).
    """
    metrics = WorkerMetrics(registry)
    budget = settings.memory_budget_bytes or default_budget(
        await asyncio.to_thread(memory.memory_total))
    core = Worker(
        catalog, models=settings.models,
        artifacts=ArtifactCache(session, Path(settings.cache_dir), stores=settings.stores),
        backend_factory=backend_factory(settings.threads, max_threads=settings.max_threads,
                                        triton_urls=settings.triton_urls,
                                        triton_timeout=settings.triton_timeout),
        metrics=metrics, budget_bytes=budget or None, thrash_window=settings.thrash_window,
        inline_below=settings.inline_below_ms / 1000,
    )

    def publish() -> None:
        if publish_warmup is not None:
            publish_warmup(core.warmup_records())
        if publish_fallbacks is not None:
            publish_fallbacks(core.fallbacks())
        if publish_resident is not None:
            publish_resident(core.resident_versions())
        publish_models(core.ready_versions())

    core.subscribe(publish)
    core.start()
    stack.push_async_callback(core.aclose)
    return WorkerService(core, metrics, settings)


async def await_replacement(
    config: ConfigView, session: aiohttp.ClientSession, *, instance: str,
    versions: Iterable[str], poll: float = 0.5,
) -> None:
    """Return once another live, ready, non-draining worker (not `instance`) serves each of
    `versions` (`model/version`).

    The endpoint records in `config` name the candidates; each must also answer its
    `/healthz`: the record of a worker killed a moment ago stays in etcd until its lease
    expires (10 s), and handing off to it would leave the version with no worker at all.
    """
    wanted = set(versions)
    changed = asyncio.Event()
    config.subscribe(changed.set)
    while not await _covered(session, config.items("endpoints/worker/"),
                             instance=instance, wanted=wanted):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), poll)
        changed.clear()


async def _covered(
    session: aiohttp.ClientSession, records: Mapping[str, Any], *, instance: str,
    wanted: set[str],
) -> bool:
    candidates = [
        record for record in records.values()
        if isinstance(record, dict) and record.get("instance") != instance
        and not record.get("draining") and wanted & set(record.get("models", ()))
        and isinstance(record.get("http"), str)
    ]
    live = await asyncio.gather(*(_answers(session, record["http"]) for record in candidates))
    serving: set[str] = set()
    for record, alive in zip(candidates, live, strict=True):
        if alive:
            serving.update(record.get("models", ()))
    return wanted <= serving


async def _answers(session: aiohttp.ClientSession, base_url: str) -> bool:
    try:
        async with session.get(f"{base_url}/healthz",
                               timeout=aiohttp.ClientTimeout(total=1.0)) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
