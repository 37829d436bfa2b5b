"""`python -m services.worker`: a worker serving the models it is configured for."""

from __future__ import annotations

from pathlib import Path

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.worker.app import create_app
from services.worker.artifacts import ArtifactCache
from services.worker.core import Worker
from services.worker.factory import backend_factory
from services.worker.metrics import WorkerMetrics
from services.worker.settings import WorkerSettings


async def main() -> None:
    settings = load_settings(WorkerSettings, "worker")
    telemetry.setup_tracing("worker")
    async with MeshNode(settings, service="worker") as node:
        assert node.session is not None
        metrics = WorkerMetrics()
        core = Worker(
            ModelCatalog(node.config), models=settings.models,
            artifacts=ArtifactCache(node.session, Path(settings.cache_dir)),
            backend_factory=backend_factory(settings.threads), metrics=metrics,
        )
        core.subscribe(lambda: node.update_record(models=core.ready_versions()))
        core.start()
        try:
            await node.serve(
                create_app(core, metrics, drain_timeout=settings.drain_timeout),
                roles={"worker": {"link": node.link_url, "models": core.ready_versions()}},
            )
        finally:
            await core.aclose()


if __name__ == "__main__":
    run(main)
