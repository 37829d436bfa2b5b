"""Building a router from its settings: `python -m services.router` and fused mode both call
`build_router`, and differ only in the batcher they hand it (a link pool, or the in-process
batcher core)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.hops import InferTarget
from services.mesh.transport.auth import Credential
from services.predlog.log import start_prediction_log
from services.router.app import create_app
from services.router.core import Router
from services.router.feature_store import open_feature_rows
from services.router.features import OnlineFeatures
from services.router.metrics import RouterMetrics
from services.router.settings import RouterSettings


@dataclass(frozen=True, slots=True)
class RouterService:
    """A built router: its core, and the app that serves it to gateways over links."""

    core: Router
    settings: RouterSettings

    def link_app(self, credential: Credential) -> web.Application:
        """Serve the core over links (`/link`, `/metrics`, `/healthz`) to callers presenting
        `credential`; not in fused mode."""
        return create_app(self.core, credential=credential,
                          max_frame_bytes=self.settings.max_frame_bytes,
                          drain_timeout=self.settings.drain_timeout)


async def build_router(
    settings: RouterSettings, stack: contextlib.AsyncExitStack, *, catalog: ModelCatalog,
    batcher: InferTarget, registry: CollectorRegistry | None = None,
) -> RouterService:
    """The router per `settings`, forwarding to `batcher`, its metrics in `registry` (its own
    when None), with its prediction log when `settings.database_url` names one.

    What it starts closes through `stack`: the core first, then the prediction log (which
    writes, or spills, what the core handed it).
    """
    metrics = RouterMetrics(registry)
    # Postgres need not be up: the log spills to disk until it is.
    predictions = await start_prediction_log(
        settings.database_url, registry=metrics.registry, instance=settings.instance_id,
        spool_root=settings.prediction_log_spool, max_buffered=settings.prediction_log_buffer,
        spill_max_bytes=settings.prediction_log_spill_max_bytes,
    )
    if predictions is not None:
        stack.push_async_callback(predictions.aclose)
    features = None
    if settings.database_url:  # the online feature store shares the prediction log's Postgres
        rows = await stack.enter_async_context(open_feature_rows(settings.database_url))
        features = OnlineFeatures(rows, timeout=settings.feature_timeout,
                                  cache_ttl=settings.feature_cache_ttl)
        stack.push_async_callback(features.aclose)
    core = Router(
        catalog, batcher, metrics=metrics, shadow_max_inflight=settings.shadow_max_inflight,
        prediction_log=predictions, features=features,
    )
    stack.push_async_callback(core.aclose)
    return RouterService(core, settings)
