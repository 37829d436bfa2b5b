"""`python -m services.router`: the router, between gateways and batchers."""

from __future__ import annotations

import contextlib

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.mesh.transport.linked import LinkedInferTarget
from services.router.settings import RouterSettings
from services.router.wiring import build_router


async def main() -> None:
    settings = load_settings(RouterSettings, "router")
    telemetry.setup_tracing("router")
    async with MeshNode(settings, service="router") as node, contextlib.AsyncExitStack() as stack:
        assert node.session is not None
        batchers = node.link_pool("batcher")
        batchers.start()
        stack.push_async_callback(batchers.aclose)
        node.watch_health(pools=[batchers])
        catalog = ModelCatalog(node.config)
        router = await build_router(
            settings, stack, catalog=catalog,
            batcher=LinkedInferTarget(batchers, affinity=True, spread=catalog.batchers),
        )
        await node.serve(router.link_app(node.credential),
                         roles={"router": {"link": node.link_url}})


if __name__ == "__main__":
    run(main)
