"""Building a gateway from its settings: `python -m services.gateway` and fused mode both call
`build_gateway`, and differ only in the router they hand it (a link pool, or the in-process
router core)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.feature_store import open_feature_writes
from services.gateway.features import FeatureWriter
from services.gateway.feedback import FeedbackRecorder
from services.gateway.feedback_store import open_feedback_store
from services.gateway.grpc_app import create_grpc_server
from services.gateway.jobs_wiring import open_jobs
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.hops import InferTarget
from services.webhooks.dispatcher import config_allowlists, open_dispatcher
from services.webhooks.metrics import WebhookMetrics


@dataclass(frozen=True, slots=True)
class GatewayService:
    """A built gateway: its core, its REST app (to serve), and its gRPC server (serving)."""

    core: Gateway
    app: web.Application
    """The OIP REST API, `POST /v1/feedback` and /metrics, for `MeshNode.serve`."""
    grpc_address: str
    """host:port of the OIP gRPC API, started already."""


async def build_gateway(
    settings: GatewaySettings, stack: contextlib.AsyncExitStack, *, catalog: ModelCatalog,
    router: InferTarget, registry: CollectorRegistry | None = None,
) -> GatewayService:
    """The gateway per `settings`, forwarding to `router`, its metrics in `registry` (its own
    when None): the core, its REST app, and its gRPC server started.

    Closed through `stack`: the gRPC server stops first (within `drain_timeout`), then the
    feedback store's pool.
    """
    access = Access.from_settings(catalog.config, settings)
    core = Gateway(
        catalog, router, access=access, metrics=GatewayMetrics(registry),
        default_timeout=settings.default_timeout, sticky_headers=settings.sticky_headers,
    )
    core.overload.start_probe()
    stack.push_async_callback(core.overload.aclose)
    store = await stack.enter_async_context(
        open_feedback_store(settings.database_url, timeout=settings.database_timeout)
    )
    feedback = FeedbackRecorder(access, store, metrics=core.metrics)
    feature_writes = await stack.enter_async_context(
        open_feature_writes(settings.database_url, timeout=settings.database_timeout)
    )
    features = FeatureWriter(access, feature_writes, metrics=core.metrics)
    grpc_server, grpc_port = create_grpc_server(
        core, host=settings.host, port=settings.grpc_port,
        compression=settings.grpc_compression, max_message_bytes=settings.max_body_bytes,
    )
    await grpc_server.start()
    stack.push_async_callback(grpc_server.stop, grace=settings.drain_timeout)
    jobs = await open_jobs(settings, stack, core=core, access=access)
    if settings.database_url and settings.job_runner:  # jobs' webhooks go out from here
        await stack.enter_async_context(open_dispatcher(
            settings.database_url, allowlists=config_allowlists(catalog.config),
            metrics=WebhookMetrics(core.metrics.registry)))
    app = create_app(core, max_body_bytes=settings.max_body_bytes, feedback=feedback,
                     features=features, jobs=jobs)
    return GatewayService(core, app, f"{settings.host}:{grpc_port}")
