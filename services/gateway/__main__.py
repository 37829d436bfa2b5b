"""`python -m services.gateway`: the gateway, forwarding to routers over links."""

from __future__ import annotations

import dataclasses

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.feedback import FeedbackRecorder
from services.gateway.feedback_store import open_feedback_store
from services.gateway.grpc_app import create_grpc_server
from services.gateway.settings import GatewaySettings
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.mesh.transport.linked import LinkedInferTarget
from services.mesh.transport.peers import LinkPool


async def main() -> None:
    settings = load_settings(GatewaySettings, "gateway")
    settings = dataclasses.replace(settings, port=settings.http_port)
    telemetry.setup_tracing("gateway")
    async with MeshNode(settings, service="gateway") as node:
        assert node.session is not None
        routers = LinkPool(node.session, node.config, "router")
        routers.start()
        node.watch_health(pools=[routers])
        access = Access.from_settings(node.config, settings)
        core = Gateway(
            ModelCatalog(node.config), LinkedInferTarget(routers), access=access,
            default_timeout=settings.default_timeout,
        )
        grpc_server, grpc_port = create_grpc_server(
            core, host=settings.host, port=settings.grpc_port,
            compression=settings.grpc_compression, max_message_bytes=settings.max_body_bytes,
        )
        await grpc_server.start()
        try:
            async with open_feedback_store(settings.database_url,
                                           timeout=settings.database_timeout) as store:
                feedback = FeedbackRecorder(access, store, metrics=core.metrics)
                app = create_app(core, max_body_bytes=settings.max_body_bytes, feedback=feedback)
                await node.serve(app, roles={"gateway": {"grpc": f"{settings.host}:{grpc_port}"}})
        finally:
            await grpc_server.stop(grace=settings.drain_timeout)
            await routers.aclose()


if __name__ == "__main__":
    run(main)
