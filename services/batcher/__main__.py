"""`python -m services.batcher`: the batcher, between routers and workers."""

from __future__ import annotations

from services.batcher.app import create_app
from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.batcher.settings import BatcherSettings
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.mesh.transport.linked import LinkedWorkerPool
from services.mesh.transport.peers import LinkPool


async def main() -> None:
    settings = load_settings(BatcherSettings, "batcher")
    telemetry.setup_tracing("batcher")
    async with MeshNode(settings, service="batcher") as node:
        assert node.session is not None
        workers = LinkPool(node.session, node.config, "worker")
        workers.start()
        node.watch_health(pools=[workers])
        metrics = BatcherMetrics()
        core = Batcher(
            ModelCatalog(node.config), LinkedWorkerPool(workers), metrics=metrics,
            pipeline_depth=settings.pipeline_depth, no_worker_grace=settings.no_worker_grace,
            bulk_max_wait=settings.bulk_max_wait,
        )
        core.start()
        try:
            await node.serve(
                create_app(core, metrics, drain_timeout=settings.drain_timeout),
                roles={"batcher": {"link": node.link_url}},
            )
        finally:
            await core.aclose()
            await workers.aclose()


if __name__ == "__main__":
    run(main)
