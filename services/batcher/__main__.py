"""`python -m services.batcher`: the batcher, between routers and workers."""

from __future__ import annotations

import contextlib

from services.batcher.settings import BatcherSettings
from services.batcher.wiring import build_batcher
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.mesh.transport.linked import LinkedWorkerPool
from services.mesh.transport.spread import WorkerShare


async def main() -> None:
    settings = load_settings(BatcherSettings, "batcher")
    telemetry.setup_tracing("batcher")
    async with MeshNode(settings, service="batcher") as node, contextlib.AsyncExitStack() as stack:
        assert node.session is not None
        workers = node.link_pool("worker")
        workers.start()
        stack.push_async_callback(workers.aclose)
        node.watch_health(pools=[workers])
        catalog = ModelCatalog(node.config)
        share = WorkerShare(node.config, instance=node.instance, batchers=catalog.batchers)
        batcher = await build_batcher(
            settings, stack, catalog=catalog, workers=LinkedWorkerPool(workers, share=share),
        )
        await node.serve(batcher.link_app(node.credential),
                         roles={"batcher": {"link": node.link_url}})


if __name__ == "__main__":
    run(main)
