"""`python -m services.gateway`: the gateway, forwarding to routers over links."""

from __future__ import annotations

import contextlib
import dataclasses

from services.gateway.settings import GatewaySettings
from services.gateway.wiring import build_gateway
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.mesh.transport.linked import LinkedInferTarget


async def main() -> None:
    settings = load_settings(GatewaySettings, "gateway")
    settings = dataclasses.replace(settings, port=settings.http_port)
    telemetry.setup_tracing("gateway")
    async with MeshNode(settings, service="gateway") as node, contextlib.AsyncExitStack() as stack:
        assert node.session is not None
        routers = node.link_pool("router")
        routers.start()
        stack.push_async_callback(routers.aclose)
        node.watch_health(pools=[routers])
        gateway = await build_gateway(
            settings, stack, catalog=ModelCatalog(node.config), router=LinkedInferTarget(routers),
        )
        await node.serve(gateway.app, roles={"gateway": {"grpc": gateway.grpc_address}})


if __name__ == "__main__":
    run(main)
