"""`python -m services.worker`: a worker serving the models it is configured for."""

from __future__ import annotations

import contextlib

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.worker.settings import WorkerSettings
from services.worker.wiring import build_worker


async def main() -> None:
    settings = load_settings(WorkerSettings, "worker")
    telemetry.setup_tracing("worker")
    async with MeshNode(settings, service="worker") as node, contextlib.AsyncExitStack() as stack:
        assert node.session is not None
        worker = await build_worker(
            settings, stack, catalog=ModelCatalog(node.config), session=node.session,
            publish_models=lambda ready: node.update_record(models=ready),
        )
        await node.serve(worker.link_app(), roles={
            "worker": {"link": node.link_url, "models": worker.core.ready_versions()},
        })


if __name__ == "__main__":
    run(main)
