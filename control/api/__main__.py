"""`python -m control.api`: migrate, publish what etcd lacks, serve, reconcile, guard and
autoscale.

Two reconcile loops run at `reconcile_interval`: rollouts, and tenants/keys/limits.

Refuses to start (exit 2, one line on stderr) without an admin token or with bad settings.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Mapping

from control.api.app import create_app
from control.api.auth import load_tokens
from control.api.core import RolloutStore, reconcile_forever
from control.api.reports.store import ReportStore
from control.api.settings import ControlSettings
from control.api.tenants.store import TenantStore
from control.autoscaler.metrics import AutoscalerMetrics
from control.autoscaler.runner import autoscale
from control.guard.runner import run_guard
from services.mesh.domain.errors import InvalidInput
from services.mesh.infra.db import create_pool, migrate
from services.mesh.infra.health import PostgresProbe
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.mesh.transport.rest import REGISTRY

log = logging.getLogger("control.api")


async def serve(settings: ControlSettings, tokens: Mapping[str, str]) -> None:
    """Run the control API and its background loops until SIGTERM or SIGINT."""
    async with MeshNode(settings, service="control") as node:
        assert node.session is not None
        pool = await create_pool(settings.database_url)
        try:
            await migrate(pool)
            store = RolloutStore(pool, node.etcd, etcd_prefix=settings.etcd_prefix)
            tenants = TenantStore(pool, node.etcd, etcd_prefix=settings.etcd_prefix)
            await store.reconcile()
            await tenants.reconcile()
            probe = PostgresProbe(pool)
            probe.start()
            node.watch_health(postgres=[probe])
            app = create_app(store, tokens, tenants=tenants, reports=ReportStore(pool))
            tasks = [
                asyncio.create_task(
                    store.reconcile_forever(settings.reconcile_interval), name="control-reconcile"
                ),
                asyncio.create_task(
                    reconcile_forever(tenants.reconcile, settings.reconcile_interval),
                    name="control-reconcile-tenancy",
                ),
                asyncio.create_task(
                    run_guard(store, node.config, node.session, pool,
                              interval=settings.guard_interval),
                    name="control-guard",
                ),
                asyncio.create_task(
                    autoscale(node.config, node.session, pool, node.etcd,
                              etcd_prefix=settings.etcd_prefix,
                              interval=settings.autoscaler_interval,
                              metrics=AutoscalerMetrics(app[REGISTRY]),
                              engine=settings.autoscaler_actuator,
                              kube_api_url=settings.kube_api_url,
                              kube_namespace=settings.kube_namespace,
                              kube_deployment=settings.kube_deployment),
                    name="control-autoscaler",
                ),
            ]
            try:
                await node.serve(app)
            finally:
                await _stop(tasks)
                await probe.aclose()
        finally:
            await pool.close()


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("background task %s had failed", task.get_name())


def main() -> None:
    # Settings and the token file are read before the loop starts (reading a file blocks).
    try:
        settings = load_settings(ControlSettings, "control")
        tokens = load_tokens(settings)
    except InvalidInput as exc:
        print(f"infermesh control: {exc.message}", file=sys.stderr)
        sys.exit(2)
    run(functools.partial(serve, settings, tokens))


if __name__ == "__main__":
    main()
