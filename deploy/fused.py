"""`python -m deploy.fused`: gateway, router, batcher and worker in one process.

The same cores as the mesh, built by the same wiring functions as each `python -m
services.<name>` from the same settings objects (`INFERMESH_<SERVICE>_*`), wired with the
in-process next hops instead of links: same code, same API, no links. The registry and
etcd/Postgres stay outside.

One process is one mesh node: where to reach etcd, where to listen (the gateway's REST port)
and how long to drain come from the gateway's settings; every other setting of each service
is its own (tests/deploy/test_fused_settings.py checks that each one reaches its service).

One event loop is one core. With `INFERMESH_FUSED_PROCESSES=N` (`infermesh up --fused
--processes N`) the launcher starts one *core* process and N-1 *front* processes (gateway and
router only), the fronts listening on the gateway's ports with `SO_REUSEPORT`: the kernel
spreads connections over them, and every front's router sends its requests over a link to the
core's batcher, so batches still form across all of them (one batcher, one worker, one model
copy). The core also serves its batcher's link and every process its `/metrics` on a private
port of its own (the shared public port would answer for a random process).

Whether the core takes public connections too (`INFERMESH_FUSED_CORE_PUBLIC`): by default it
does with one front (N = 2: then it runs all four services) and does not from two fronts on
(N >= 3: then it runs only the batcher and the worker). The kernel spreads connections evenly,
and a core that also batches for every front then carries the busiest loop; with two fronts
and a core that only batches, the three loops share the two cores' work more evenly.
docs/PERFORMANCE.md has the figures that chose these over a public core at N = 3.

`infermesh up --fused --processes N --layout replicas` starts N cores with public ports
instead (`INFERMESH_FUSED_CORE_PUBLIC=1` each, no fronts): N whole fused data planes on the
shared ports, each batching only what reaches it, with no link between them. The launcher
gives each an equal share of the cores for its models' threads (`deploy.worker_counts`).
Quicker for a model whose cost is per request, slower for one whose batches pay (PERFORMANCE.md,
"Fused replicas").
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry

from services.batcher.settings import BatcherSettings
from services.batcher.wiring import BatcherService, build_batcher
from services.batcher.workers import LocalWorkerPool
from services.gateway.settings import GatewaySettings
from services.gateway.wiring import GatewayService, build_gateway
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import InvalidInput
from services.mesh.infra import telemetry
from services.mesh.infra.runtime import MeshNode, bind, run
from services.mesh.infra.settings import load_settings
from services.mesh.transport.linked import LinkedInferTarget
from services.router.settings import RouterSettings
from services.router.wiring import RouterService, build_router
from services.worker.settings import WorkerSettings
from services.worker.wiring import WorkerService, build_worker


@dataclass(frozen=True, slots=True)
class FusedSettings:
    """The settings of each service of the fused data plane, read as each service reads them."""

    gateway: GatewaySettings
    router: RouterSettings
    batcher: BatcherSettings
    worker: WorkerSettings

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> FusedSettings:
        """Each service's settings from `env` (default: the process environment)."""
        gateway = load_settings(GatewaySettings, "gateway", env)
        return cls(
            gateway=dataclasses.replace(gateway, port=gateway.http_port),
            router=load_settings(RouterSettings, "router", env),
            batcher=load_settings(BatcherSettings, "batcher", env),
            worker=load_settings(WorkerSettings, "worker", env),
        )


@dataclass(frozen=True, slots=True)
class FusedProcess:
    """Which process of a fused data plane this is (`INFERMESH_FUSED_*`, set by the launcher)."""

    processes: int = 1
    """Processes sharing the gateway's ports: 1 is one process with everything."""
    role: str = "core"
    """`core` (the batcher and the worker, and with `core_public` the gateway and router too)
    or `front` (gateway and router, to the core's batcher)."""
    core_public: bool | None = None
    """Whether the core also listens on the gateway's public ports; None: with one front
    (`processes` 2) it does, with more it does not (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise InvalidInput(f"INFERMESH_FUSED_PROCESSES must be >= 1, not {self.processes}")
        if self.role not in ("core", "front"):
            raise InvalidInput(f"INFERMESH_FUSED_ROLE must be core or front, not {self.role!r}")
        if self.processes == 1 and self.core_public is False:
            raise InvalidInput("INFERMESH_FUSED_CORE_PUBLIC=0 needs INFERMESH_FUSED_PROCESSES "
                               ">= 2: one process with no public port would serve no one")

    @property
    def core_serves_public(self) -> bool:
        """Whether the core listens on the public ports (`core_public`, or its default)."""
        return self.core_public if self.core_public is not None else self.processes <= 2


@dataclass(frozen=True, slots=True)
class FusedMesh:
    """The four services of one fused process, each calling the next in-process."""

    gateway: GatewayService
    router: RouterService
    batcher: BatcherService
    worker: WorkerService


async def build_fused(
    settings: FusedSettings, stack: contextlib.AsyncExitStack, *, catalog: ModelCatalog,
    session: aiohttp.ClientSession, publish_models: Callable[[list[str]], None],
) -> FusedMesh:
    """Build worker, batcher, router and gateway (in that order; they close in reverse through
    `stack`), each handed the next as its in-process next hop, metrics in one registry."""
    registry = CollectorRegistry()
    worker, batcher = await build_batching(settings, stack, catalog=catalog, session=session,
                                           publish_models=publish_models, registry=registry)
    router = await build_router(settings.router, stack, catalog=catalog, batcher=batcher.core,
                                registry=registry)
    gateway = await build_gateway(settings.gateway, stack, catalog=catalog, router=router.core,
                                  registry=registry)
    return FusedMesh(gateway, router, batcher, worker)


async def build_batching(
    settings: FusedSettings, stack: contextlib.AsyncExitStack, *, catalog: ModelCatalog,
    session: aiohttp.ClientSession, publish_models: Callable[[list[str]], None],
    registry: CollectorRegistry,
) -> tuple[WorkerService, BatcherService]:
    """The worker and the batcher dispatching to it in-process, metrics in `registry`."""
    worker = await build_worker(settings.worker, stack, catalog=catalog, session=session,
                                publish_models=publish_models, registry=registry)
    batcher = await build_batcher(settings.batcher, stack, catalog=catalog,
                                  workers=LocalWorkerPool(worker.core), registry=registry)
    return worker, batcher


async def main() -> None:
    settings = FusedSettings.load()
    process = load_settings(FusedProcess, "fused")
    telemetry.setup_tracing("fused")
    if process.processes > 1:
        if process.role == "front":
            await serve_front(settings)
        elif process.core_serves_public:
            await serve_core(settings)
        else:
            await serve_batching_core(settings)
        return
    async with (
        MeshNode(settings.gateway, service="gateway") as node,
        contextlib.AsyncExitStack() as stack,
    ):
        assert node.session is not None
        fused = await build_fused(
            settings, stack, catalog=ModelCatalog(node.config), session=node.session,
            publish_models=lambda ready: node.update_record("worker", models=ready),
        )
        await node.serve(fused.gateway.app, roles={
            "gateway": {"fused": True, "grpc": fused.gateway.grpc_address},
            # No link: listed so the rollout guard finds this router's /metrics.
            "router": {"fused": True},
            "worker": {"fused": True, "models": []},
        })


def _private(settings: FusedSettings) -> GatewaySettings:
    """The node's own port (links, `/metrics`) beside the shared public one."""
    return dataclasses.replace(settings.gateway, port=0)


async def serve_core(settings: FusedSettings) -> None:
    """The core of a multi-process fused plane: all four services, its batcher on a link."""
    public = bind(settings.gateway.host, settings.gateway.http_port, reuse_port=True)
    async with (
        MeshNode(_private(settings), service="gateway") as node,
        contextlib.AsyncExitStack() as stack,
    ):
        stack.callback(public.close)
        assert node.session is not None
        fused = await build_fused(
            settings, stack, catalog=ModelCatalog(node.config), session=node.session,
            publish_models=lambda ready: node.update_record("worker", models=ready),
        )
        links = fused.batcher.link_app(node.credential)
        await node.serve(links, public=(fused.gateway.app, public), roles={
            "gateway": {"fused": True, "grpc": fused.gateway.grpc_address},
            "router": {"fused": True},
            "batcher": {"fused": True, "link": node.link_url},
            "worker": {"fused": True, "models": []},
        })


async def serve_batching_core(settings: FusedSettings) -> None:
    """The core of a multi-process fused plane whose fronts take every public connection:
    the batcher (on a link, for the fronts) and the worker, nothing on the public ports."""
    async with (
        MeshNode(_private(settings), service="gateway") as node,
        contextlib.AsyncExitStack() as stack,
    ):
        assert node.session is not None
        _, batcher = await build_batching(
            settings, stack, catalog=ModelCatalog(node.config), session=node.session,
            publish_models=lambda ready: node.update_record("worker", models=ready),
            registry=CollectorRegistry(),
        )
        await node.serve(batcher.link_app(node.credential), roles={
            "batcher": {"fused": True, "link": node.link_url},
            "worker": {"fused": True, "models": []},
        })


async def serve_front(settings: FusedSettings) -> None:
    """A front of a multi-process fused plane: gateway and router, to the core's batcher."""
    public = bind(settings.gateway.host, settings.gateway.http_port, reuse_port=True)
    async with (
        MeshNode(_private(settings), service="gateway") as node,
        contextlib.AsyncExitStack() as stack,
    ):
        stack.callback(public.close)
        assert node.session is not None
        batchers = node.link_pool("batcher")
        batchers.start()
        stack.push_async_callback(batchers.aclose)
        node.watch_health(pools=[batchers])
        registry = CollectorRegistry()
        catalog = ModelCatalog(node.config)
        router = await build_router(settings.router, stack, catalog=catalog,
                                    batcher=LinkedInferTarget(batchers, affinity=True),
                                    registry=registry)
        gateway = await build_gateway(settings.gateway, stack, catalog=catalog,
                                      router=router.core, registry=registry)
        await node.serve(router.link_app(node.credential), public=(gateway.app, public), roles={
            "gateway": {"fused": True, "grpc": gateway.grpc_address},
            "router": {"fused": True},
        })


if __name__ == "__main__":
    run(main)
