"""`python -m services.router`: the router, between gateways and batchers."""

from __future__ import annotations

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.mesh.transport.linked import LinkedInferTarget
from services.mesh.transport.peers import LinkPool
from services.router.app import create_app
from services.router.core import Router
from services.router.metrics import RouterMetrics
from services.router.predlog import start_prediction_log
from services.router.settings import RouterSettings


async def main() -> None:
    settings = load_settings(RouterSettings, "router")
    telemetry.setup_tracing("router")
    async with MeshNode(settings, service="router") as node:
        assert node.session is not None
        batchers = LinkPool(node.session, node.config, "batcher")
        batchers.start()
        node.watch_health(pools=[batchers])
        metrics = RouterMetrics()
        # Postgres need not be up: the log spills to disk until it is.
        predictions = await start_prediction_log(settings, metrics.registry)
        core = Router(
            ModelCatalog(node.config), LinkedInferTarget(batchers, affinity=True),
            metrics=metrics, shadow_max_inflight=settings.shadow_max_inflight,
            prediction_log=predictions,
        )
        try:
            await node.serve(
                create_app(core, drain_timeout=settings.drain_timeout),
                roles={"router": {"link": node.link_url}},
            )
        finally:
            await core.aclose()
            if predictions is not None:
                await predictions.aclose()
            await batchers.aclose()


if __name__ == "__main__":
    run(main)
