"""`python -m services.worker`: a worker serving the models it is configured for."""

from __future__ import annotations

import contextlib
import os

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.worker.settings import WorkerSettings
from services.worker.wiring import await_replacement, build_worker


async def main() -> None:
    settings = load_settings(WorkerSettings, "worker")
    telemetry.setup_tracing("worker")
    async with MeshNode(settings, service="worker") as node, contextlib.AsyncExitStack() as stack:
        session = node.session
        assert session is not None
        worker = await build_worker(
            settings, stack, catalog=ModelCatalog(node.config), session=session,
            publish_models=lambda ready: node.update_record(models=ready),
            publish_warmup=lambda timings: node.update_record(warmup=timings),
            publish_fallbacks=lambda fallbacks: node.update_record(fallback=fallbacks),
            publish_resident=lambda resident: node.update_record(resident=resident),
        )
        # SIGTERM: marked draining, this worker serves on until another live, ready worker has
        # each of its versions (the launcher starts one on seeing the mark), then drains.
        await node.serve(worker.link_app(node.credential), roles={
            "worker": {"link": node.link_url, "models": worker.core.ready_versions(),
                       "resident": worker.core.resident_versions(), "pid": os.getpid()},
        }, handoff=lambda: await_replacement(
            node.config, session, instance=node.instance,
            versions=worker.core.ready_versions(),
        ))


if __name__ == "__main__":
    run(main)
