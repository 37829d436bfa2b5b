"""`python -m deploy.fused`: gateway, router, batcher and worker in one process.

The same cores as the mesh, wired with the in-process next-hop implementations instead of
links: same code, same API, no links. The registry and etcd/Postgres stay outside.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.batcher.workers import LocalWorkerPool
from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.feedback import FeedbackRecorder
from services.gateway.feedback_store import open_feedback_store
from services.gateway.grpc_app import create_grpc_server
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.router.core import Router
from services.router.metrics import RouterMetrics
from services.router.predlog import start_prediction_log
from services.router.settings import RouterSettings
from services.worker.artifacts import ArtifactCache
from services.worker.core import Worker
from services.worker.factory import backend_factory
from services.worker.metrics import WorkerMetrics
from services.worker.settings import WorkerSettings


async def main() -> None:
    settings = load_settings(GatewaySettings, "gateway")
    settings = dataclasses.replace(settings, port=settings.http_port)
    worker_settings = load_settings(WorkerSettings, "worker")
    router_settings = load_settings(RouterSettings, "router")
    telemetry.setup_tracing("fused")
    async with MeshNode(settings, service="gateway") as node:
        assert node.session is not None
        catalog = ModelCatalog(node.config)
        registry = CollectorRegistry()
        worker = Worker(
            catalog, models=worker_settings.models,
            artifacts=ArtifactCache(node.session, Path(worker_settings.cache_dir)),
            backend_factory=backend_factory(worker_settings.threads),
            metrics=WorkerMetrics(registry),
        )
        batcher = Batcher(catalog, LocalWorkerPool(worker), metrics=BatcherMetrics(registry))
        predictions = await start_prediction_log(router_settings, registry)
        router = Router(catalog, batcher, metrics=RouterMetrics(registry),
                        prediction_log=predictions)
        access = Access.from_settings(node.config, settings)
        gateway = Gateway(
            catalog, router, access=access,
            metrics=GatewayMetrics(registry), default_timeout=settings.default_timeout,
        )
        worker.subscribe(lambda: node.update_record("worker", models=worker.ready_versions()))
        batcher.start()
        worker.start()
        grpc_server, grpc_port = create_grpc_server(
            gateway, host=settings.host, port=settings.grpc_port,
            compression=settings.grpc_compression, max_message_bytes=settings.max_body_bytes,
        )
        await grpc_server.start()
        try:
            async with open_feedback_store(settings.database_url,
                                           timeout=settings.database_timeout) as store:
                feedback = FeedbackRecorder(access, store, metrics=gateway.metrics)
                app = create_app(gateway, max_body_bytes=settings.max_body_bytes,
                                 feedback=feedback)
                await node.serve(app, roles={
                    "gateway": {"fused": True, "grpc": f"{settings.host}:{grpc_port}"},
                    # No link: listed so the rollout guard finds this router's /metrics.
                    "router": {"fused": True},
                    "worker": {"fused": True, "models": []},
                })
        finally:
            await grpc_server.stop(grace=settings.drain_timeout)
            await router.aclose()
            if predictions is not None:
                await predictions.aclose()
            await batcher.aclose()
            await worker.aclose()


if __name__ == "__main__":
    run(main)
