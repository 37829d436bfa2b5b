"""`infermesh up`: the whole mesh on one machine, supervised, in the foreground.

Starts private etcd and Postgres under the state dir (unless `INFERMESH_ETCD_URL` /
`INFERMESH_DATABASE_URL` are given), applies migrations, starts the registry, gateway, router,
batcher (or the fused data plane) and the workers: one set per model, each serving all of its
versions, plus one per version registered `worker: dedicated` (or one per version with
`INFERMESH_WORKERS_PER=version`), as many as the `scale/` records ask: `deploy.workers`),
registers the demo models, prints the endpoints and
a curl line, and stops everything on Ctrl-C or SIGTERM.

Workers are replaced, never just stopped: a worker that gets SIGTERM marks its endpoint record
`draining` and the launcher starts its replacement at once (the old one exits once the new one
is ready); `replace_worker` does the same in the other order (start, wait until ready, then
SIGTERM the old one), and SIGHUP to the launcher runs it for every worker, one at a time.
"""

from __future__ import annotations

import os

# Children are spawned while this process holds a gRPC channel (etcd): keep gRPC's fork
# handlers out of it. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio  # noqa: E402
import contextlib
import itertools
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import uvloop

from control.registry_client import RegistryClient, RegistryError, register_file
from deploy.admin_token import control_tokens, first_secret
from deploy.banner import OFF, BannerFacts, banner
from deploy.child_env import BindHosts, ChildSecrets, child_env, dial, service_of
from deploy.demo_tenant import ensure_demo_key
from deploy.edge import Edge, EdgeConfig, nginx_binary, start_edge
from deploy.edge_bounds import EdgeBounds
from deploy.localdeps import LocalEtcd, LocalPostgres, free_port, start_etcd, start_postgres
from deploy.secrets import ensure_mesh_credential
from deploy.supervisor import Supervised
from deploy.worker_counts import (
    fused_layout,
    handoff_bound,
    replica_threads,
    workers_per_version,
)
from deploy.workers import WorkerFleet
from services.mesh.domain.errors import InfermeshError
from services.mesh.infra.credentials import MeshCredential
from services.mesh.infra.db import create_pool, migrate
from services.mesh.infra.etcd import ConfigCache, connect_client, redact_url
from services.mesh.infra.settings import available_cores

log = logging.getLogger("infermesh.up")


class Launcher:
    """Owns the local dependencies and the supervised service processes."""

    def __init__(self, state_dir: Path, *, fused: bool, demo: bool) -> None:
        self.state_dir = state_dir.resolve()
        self.fused = fused
        self.demo = demo
        self.gateway_port = int(os.environ.get("INFERMESH_GATEWAY_HTTP_PORT", "8000"))
        self.grpc_port = int(os.environ.get("INFERMESH_GATEWAY_GRPC_PORT", "8001"))
        self.registry_port = int(os.environ.get("INFERMESH_REGISTRY_PORT", "8200"))
        self.control_port = int(os.environ.get("INFERMESH_CONTROL_PORT", "8100"))
        self.router_replicas = int(os.environ.get("INFERMESH_ROUTER_REPLICAS", "1"))
        self.fused_processes = int(os.environ.get("INFERMESH_FUSED_PROCESSES", "1"))
        self.fused_layout = fused_layout(os.environ)
        self.workers_per_version = workers_per_version(os.environ)
        self.auth = os.environ.get("INFERMESH_GATEWAY_AUTH", "1").lower() not in OFF
        self.edge = _edge_config(BindHosts.from_env(os.environ).public, self.gateway_port,
                                 self.grpc_port)
        self._edge: Edge | None = None
        self._edge_bounds: EdgeBounds | None = None
        self.prefix = os.environ.get("INFERMESH_ETCD_PREFIX", "/infermesh/")
        self._etcd: LocalEtcd | None = None
        self._postgres: LocalPostgres | None = None
        self._children: list[Supervised] = []
        self._fleet: WorkerFleet[Supervised] | None = None
        self._env: dict[str, str] = {}
        """The launcher's own view, secrets included; each child gets `child_env` of it."""
        self._secrets = ChildSecrets(etcd_url="", database_url="", admin_tokens="")
        self.hosts = BindHosts.from_env(os.environ)

    def start_dependencies(self) -> None:
        """Private etcd and Postgres unless URLs are given (blocking; before the loop)."""
        etcd_url = os.environ.get("INFERMESH_ETCD_URL")
        etcd_urls: dict[str, str] | None = None
        if not etcd_url:
            self._etcd = start_etcd(self.state_dir / "etcd", port=_port_or_free(2379),
                                    prefix=self.prefix)
            etcd_url = self._etcd.url_for("launcher")
            etcd_urls = {user: self._etcd.url_for(user) for user in self._etcd.passwords}
        database_url = os.environ.get("INFERMESH_DATABASE_URL")
        if not database_url:
            self._postgres = start_postgres(self.state_dir / "postgres")
            database_url = self._postgres.dsn
        self._env = {
            **os.environ, "INFERMESH_ETCD_URL": etcd_url, "INFERMESH_DATABASE_URL": database_url,
            "INFERMESH_ETCD_PREFIX": self.prefix,
            "INFERMESH_REGISTRY_PORT": str(self.registry_port),
            "INFERMESH_CONTROL_PORT": str(self.control_port),
            "INFERMESH_CONTROL_ADMIN_TOKENS": control_tokens(self.state_dir),
            "INFERMESH_MESH_CREDENTIAL_FILE": os.environ.get("INFERMESH_MESH_CREDENTIAL_FILE")
            or str(ensure_mesh_credential(self.state_dir)),
            "INFERMESH_REGISTRY_ARTIFACT_DIR": str(self.state_dir / "artifacts"),
            "INFERMESH_GATEWAY_HTTP_PORT": str(self.gateway_port),
            "INFERMESH_GATEWAY_GRPC_PORT": str(self.grpc_port),
            "INFERMESH_WORKER_CACHE_DIR": str(self.state_dir / "worker-cache"),
            # Routers (and fused) spill prediction rows here while Postgres is away.
            "INFERMESH_ROUTER_PREDICTION_LOG_SPOOL": os.environ.get(
                "INFERMESH_ROUTER_PREDICTION_LOG_SPOOL", str(self.state_dir / "spool")),
        }
        self._secrets = ChildSecrets(
            etcd_url=etcd_url, database_url=database_url, etcd_urls=etcd_urls,
            admin_tokens=self._env["INFERMESH_CONTROL_ADMIN_TOKENS"])
        if not _collector_configured(os.environ):
            # No OTLP collector: spans go to local files that `infermesh trace` reads.
            self._env.setdefault("INFERMESH_TRACE_DIR", str(self.state_dir / "traces"))

    def stop_dependencies(self) -> None:
        if self._postgres is not None:
            self._postgres.stop()
        if self._etcd is not None:
            self._etcd.stop()

    def _spawn(self, name: str, module: str, **env: str) -> Supervised:
        own = child_env(service_of(name), self._env, self._secrets, self.hosts)
        child = Supervised(name, ["-m", module], env={**own, **env},
                           log_dir=self.state_dir / "logs")
        child.start()
        # Drained (retired) workers that have exited leave the list.
        self._children = [c for c in self._children if not c.finished]
        self._children.append(child)
        return child

    async def run(self, stop: asyncio.Event) -> None:
        """Bring the mesh up, then supervise until `stop` is set."""
        await asyncio.to_thread((self.state_dir / "logs").mkdir, parents=True, exist_ok=True)
        pool = await create_pool(self._env["INFERMESH_DATABASE_URL"])
        try:
            await migrate(pool)
        finally:
            await pool.close()
        self._spawn("registry", "services.registry")
        self._spawn("control", "control.api")
        if self.fused and self.fused_layout == "replicas":
            # Whole fused processes on the gateway's shared ports, each batching for itself,
            # the cores shared out between their models' threads.
            threads = replica_threads(self._env, self.fused_processes, available_cores())
            for replica in range(self.fused_processes):
                self._spawn("fused" if replica == 0 else f"fused-{replica}", "deploy.fused",
                            INFERMESH_WORKER_MODELS="*", INFERMESH_FUSED_CORE_PUBLIC="1",
                            **threads)
        elif self.fused:
            # One core process (all four services); fronts (gateway + router) share its ports.
            self._spawn("fused", "deploy.fused", INFERMESH_WORKER_MODELS="*")
            for front in range(1, self.fused_processes):
                self._spawn(f"fused-front-{front}", "deploy.fused", INFERMESH_FUSED_ROLE="front")
        else:
            for replica in range(self.router_replicas):
                self._spawn("router" if replica == 0 else f"router-{replica}", "services.router")
            for name in ("batcher", "gateway"):
                self._spawn(name, f"services.{name}")
        etcd = connect_client(self._secrets.etcd_for("launcher"))
        config = ConfigCache(etcd, self.prefix)
        try:
            await config.start()
            if not self.fused:
                fleet = self._fleet = WorkerFleet(
                    self._spawn_worker, config, handoff_bound=handoff_bound(self._env),
                    per_version=self.workers_per_version)
                config.subscribe(fleet.ensure)
                fleet.ensure()
            await self._start_edge()
            if self._edge is not None and self.edge is not None:
                # The registry's `edge_inflight` per model, applied by reloading nginx.
                self._edge_bounds = EdgeBounds(self._edge.reload, self.edge, config)
                config.subscribe(self._edge_bounds.changed)
                self._edge_bounds.changed()
            async with aiohttp.ClientSession() as session:
                models = await self._register_demo_models(session) if self.demo else []
                await self._wait_ready(session, stop, models)
            await stop.wait()
        finally:
            if self._fleet is not None:
                await self._fleet.aclose()
            if self._edge_bounds is not None:
                await self._edge_bounds.aclose()
            await config.aclose()
            await etcd.close()
            if self._edge is not None:
                await asyncio.to_thread(self._edge.stop)
                await asyncio.to_thread(shutil.rmtree, self._edge.prefix, True)
            await self.stop_children()

    async def _start_edge(self) -> None:
        """nginx in front of the gateway for HTTP/2, when nginx is installed."""
        if self.edge is None:
            return
        if nginx_binary() is None:
            log.warning("nginx not found: no HTTP/2 edge (REST over HTTP/1.1 and gRPC still work)")
            return
        # nginx workers run unprivileged: their temp dirs must not sit under a private dir.
        prefix = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="infermesh-edge-"))
        await asyncio.to_thread(prefix.chmod, 0o755)
        self._edge = await asyncio.to_thread(start_edge, self.edge, prefix)

    def _spawn_worker(self, model: str, version: str | None) -> Supervised:
        """A worker process of `model`'s shared versions (`version` None), named
        `worker-{model}`, or of `version` alone, `worker-{model}-{version}`; the others
        (scaled up, or a replacement while the old one drains) `...-{i}`, the smallest `i` no
        live process has (it names the log file too)."""
        served = model if version is None else f"{model}/{version}"
        base = "worker-" + served.replace("/", "-")
        taken = {child.name for child in self._children if not child.finished}
        names = itertools.chain([base], (f"{base}-{i}" for i in itertools.count(1)))
        name = next(n for n in names if n not in taken)
        return self._spawn(name, "services.worker", INFERMESH_WORKER_MODELS=served)

    def worker(self, model: str, version: str) -> Supervised | None:
        """The oldest supervised worker process serving (model, version), if one was
        started: the model's shared one, or the version's own when it is dedicated."""
        return self._fleet.worker(model, version) if self._fleet is not None else None

    async def replace_worker(self, model: str, version: str, *, timeout: float = 300.0) -> None:
        """Start a new worker for (model, version), wait until it is ready, then SIGTERM the
        old one (which drains and exits); see `WorkerFleet.replace`."""
        assert self._fleet is not None, "workers run once the launcher runs, in mesh mode"
        await self._fleet.replace(model, version, timeout=timeout)

    def rolling_restart(self) -> None:
        """SIGHUP: replace every worker, one at a time (mesh mode; fused has none)."""
        if self._fleet is None:
            log.info("SIGHUP: no separate worker processes to restart")
            return
        self._fleet.rolling_restart()

    async def _register_demo_models(self, session: aiohttp.ClientSession) -> list[str]:
        from services.worker.demo_models import build_demo_models

        models = await asyncio.to_thread(build_demo_models, self.state_dir / "demo-models")
        credential = await asyncio.to_thread(
            MeshCredential.load, self._env["INFERMESH_MESH_CREDENTIAL_FILE"]
        )
        registry = f"http://{dial(self.hosts.internal)}:{self.registry_port}"
        client = RegistryClient(session, registry, credential=credential)
        await _wait_http(session, f"{registry}/v2/health/live", 60)
        for demo in models:
            try:
                await register_file(client, demo.name, demo.version, demo.artifact,
                                    demo.signature, batching=demo.batching, device=demo.device)
            except RegistryError as exc:
                if exc.status != 409:
                    raise
                # Rebuilt demo files differ in bytes (TorchScript writes a random id); the
                # version registered earlier in this state dir keeps serving.
                log.warning("demo model %s version %s is already registered with another "
                            "artifact; keeping that one", demo.name, demo.version)
                continue
            log.info("registered demo model %s version %s", demo.name, demo.version)
        return [demo.name for demo in models]

    async def _wait_ready(
        self, session: aiohttp.ClientSession, stop: asyncio.Event, models: list[str]
    ) -> None:
        """Wait for the gateway, the control API and each model named to be ready to serve."""
        waiter = asyncio.create_task(self._ready(session, models))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not waiter.done() or waiter.exception():
            waiter.cancel()
            return
        print(self.banner(), flush=True)

    async def _ready(self, session: aiohttp.ClientSession, models: list[str]) -> None:
        base = f"http://{dial(self.hosts.public)}:{self.gateway_port}/v2"
        control = f"http://{dial(self.hosts.admin)}:{self.control_port}"
        await _wait_all(session, [f"{base}/health/ready", f"{control}/v1/health"], 300)
        headers = {}
        if self.auth:  # model endpoints need a key: the demo tenant's
            token = first_secret(self._env["INFERMESH_CONTROL_ADMIN_TOKENS"])
            key = await ensure_demo_key(session, control, token, self.state_dir)
            headers["Authorization"] = f"Bearer {key}"
        await _wait_all(session, [f"{base}/models/{m}/ready" for m in models], 300,
                        headers=headers)

    def banner(self) -> str:
        return banner(BannerFacts(
            fused=self.fused, gateway_port=self.gateway_port, grpc_port=self.grpc_port,
            registry_port=self.registry_port, control_port=self.control_port,
            state_dir=self.state_dir, etcd_url=redact_url(self._env["INFERMESH_ETCD_URL"]),
            edge=self.edge if self._edge is not None else None, auth=self.auth,
            traces=_trace_target(self._env),
        ))

    async def stop_children(self) -> None:
        """Stop services in reverse order of start: data plane first, registry last."""
        for child in reversed(self._children):
            # Workers stop now (SIGINT): at shutdown no replacement is coming.
            await child.stop(now=child.name.startswith("worker-"))
        self._children.clear()


def _edge_config(host: str, gateway_port: int, grpc_port: int) -> EdgeConfig | None:
    """The edge from `INFERMESH_EDGE_*` (port 8080; TLS on 8443 with a cert and key)."""
    if os.environ.get("INFERMESH_EDGE", "1") == "0":
        return None
    cert, key = os.environ.get("INFERMESH_EDGE_CERT"), os.environ.get("INFERMESH_EDGE_KEY")
    return EdgeConfig(
        host=host, h2c_port=int(os.environ.get("INFERMESH_EDGE_PORT", "8080")),
        rest_upstream=f"{dial(host)}:{gateway_port}", grpc_upstream=f"{dial(host)}:{grpc_port}",
        tls_port=int(os.environ.get("INFERMESH_EDGE_TLS_PORT", "8443")) if cert and key else None,
        certificate=Path(cert) if cert else None, key=Path(key) if key else None,
        grpc_bridge=os.environ.get("INFERMESH_EDGE_GRPC_BRIDGE", "1") != "0",
        max_conns=int(os.environ.get("INFERMESH_EDGE_MAX_CONNS", str(EdgeConfig.max_conns))),
        model_conns=int(os.environ.get("INFERMESH_EDGE_MODEL_CONNS",
                                       str(EdgeConfig.model_conns))),
    )


async def _wait_all(
    session: aiohttp.ClientSession, urls: list[str], timeout: float, *,
    headers: dict[str, str] | None = None,
) -> None:
    async with asyncio.timeout(timeout):
        for url in urls:
            await _wait_http(session, url, timeout, headers=headers)


async def _wait_http(
    session: aiohttp.ClientSession, url: str, timeout: float, *,
    headers: dict[str, str] | None = None,
) -> None:
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url, headers=headers) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)


def _collector_configured(env: Mapping[str, str]) -> bool:
    return bool(_collector(env))


def _collector(env: Mapping[str, str]) -> str:
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )


def _trace_target(env: Mapping[str, str]) -> str:
    """Where the services send spans, for the banner."""
    return env.get("INFERMESH_TRACE_DIR") or _collector(env)


def _port_or_free(preferred: int) -> int:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def make_private(state_dir: Path) -> None:
    """Create `state_dir` 0700 and make every file this process and its children create from
    now on (secrets, logs, traces, spool) 0600: the mesh's files are this user's alone."""
    os.umask(0o077)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)


def run_up(*, state_dir: Path, fused: bool = False, demo: bool = True) -> int:
    """Entry point of `infermesh up`; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        launcher = Launcher(state_dir, fused=fused, demo=demo)
    except (ValueError, InfermeshError) as exc:  # a setting it cannot take, named
        print(f"infermesh up: error: {exc}", file=sys.stderr, flush=True)
        return 2
    make_private(launcher.state_dir)
    launcher.start_dependencies()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_main(launcher))
    finally:
        launcher.stop_dependencies()
    print("infermesh stopped.", flush=True)
    return 0


async def _main(launcher: Launcher) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, launcher.rolling_restart)
    await launcher.run(stop)
