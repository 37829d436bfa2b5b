"""Running one service instance: etcd, config cache, HTTP session, socket, registration.

`__main__` modules do

    async with MeshNode(settings, service="router") as node:
        core = Router(ModelCatalog(node.config), ...)
        await node.serve(create_app(core), record={...})

`serve` publishes the leased endpoint key(s), runs until SIGTERM or SIGINT, then deregisters
first (peers stop sending), lets the app drain its in-flight work and closes everything in
reverse order of creation. A service that can hand its work off (a worker) passes `handoff`:
on SIGTERM its records are marked `draining: true` first, and it keeps serving until
`handoff()` returns (a replacement is ready) or `handoff_timeout` passes. SIGINT (and a
vanished parent) skip the handoff: stop now.

A client that goes away cancels its handler (`handler_cancellation`), so whatever the request
held (a tenant's concurrency slot, a queued call downstream) is given back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from services.mesh.infra import tls
from services.mesh.infra.credentials import MeshCredential
from services.mesh.infra.etcd import ConfigCache, Registration, connect_client
from services.mesh.infra.health import HealthCollector, PostgresProbe
from services.mesh.infra.settings import ServiceSettings
from services.mesh.transport.peers import LinkPool
from services.mesh.transport.rest import REGISTRY

log = logging.getLogger(__name__)


def setup_logging() -> None:
    level = os.environ.get("INFERMESH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


LISTEN_BACKLOG = 4096
"""Connections the kernel holds for a service while its loop is busy (capped by the kernel at
net.core.somaxconn, 4096 on current kernels). aiohttp's sites listen
again with 128 unless told: a burst of new connections beyond that overflowed the accept queue,
and each dropped SYN came back after TCP's 1 s, 3 s, ... retransmission timeouts (requests
"answered in time" by the gateway's clock arrived seconds late at the client)."""


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one. With `reuse_port`, several processes
    listen on one port and the kernel spreads new connections over them (`SO_REUSEPORT`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


MESH_SERVICES = frozenset({"gateway", "router", "batcher", "worker", "registry"})
"""Services that call or serve links and the registry: they need the mesh credential (and
refuse to start without one). Others (the control API) never get it: least privilege."""

PARENT_PID = "INFERMESH_PARENT_PID"
"""Set by the launcher's supervisor: the pid a supervised service expects as its parent."""


async def watch_parent(expected: int, on_gone: Callable[[], None], *,
                       interval: float = 1.0) -> None:
    """Call `on_gone()` once this process's parent is no longer `expected`.

    A launcher that is SIGKILLed cannot stop its children; they notice the re-parenting and
    stop themselves (`prctl(PR_SET_PDEATHSIG)` would need a preexec hook, which costs Popen
    its vfork, and forking next to gRPC's threads crashed the launcher before).
    """
    while True:
        if os.getppid() != expected:
            break
        await asyncio.sleep(interval)
    log.warning("parent %d is gone (now %d): stopping", expected, os.getppid())
    on_gone()


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main()` on uvloop; used by every `__main__`."""
    setup_logging()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


class MeshNode:
    """The resources one service instance shares, opened and closed together."""

    def __init__(self, settings: ServiceSettings, *, service: str) -> None:
        self.settings = settings
        self.service = service
        self.instance = settings.instance_id
        self.etcd = connect_client(settings.etcd_url)
        self.config = ConfigCache(self.etcd, settings.etcd_prefix)
        self.session: aiohttp.ClientSession | None = None
        self.sock: socket.socket | None = None
        self._registrations: dict[str, Registration] = {}
        self._changes: dict[str, dict[str, Any]] = {}
        self._stop: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._pools: list[LinkPool] = []
        self._probes: list[PostgresProbe] = []
        self._credential: MeshCredential | None = None
        self._server_tls: ssl.SSLContext | None = None

    @property
    def credential(self) -> MeshCredential:
        """The mesh credential (loaded on entry): presented by this node's session and links,
        required by its internal servers."""
        if self._credential is None:
            raise RuntimeError(f"{self.service} holds no mesh credential (only "
                               f"{', '.join(sorted(MESH_SERVICES))} do, once entered)")
        return self._credential

    @property
    def http_url(self) -> str:
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        return f"{'https' if self._server_tls else 'http'}://{host}:{port}"

    @property
    def link_url(self) -> str:
        return self.http_url.replace("http", "ws", 1) + "/link"

    def link_pool(self, service: str) -> LinkPool:
        """A pool of links to `service`, presenting the mesh credential (the caller starts
        and closes it)."""
        assert self.session is not None
        return LinkPool(self.session, self.config, service, credential=self.credential,
                        max_frame_bytes=self.settings.max_frame_bytes)

    async def __aenter__(self) -> MeshNode:
        self._stop, self._hurry = asyncio.Event(), asyncio.Event()
        if self.service in MESH_SERVICES:
            self._credential = await asyncio.to_thread(
                MeshCredential.load, self.settings.mesh_credential_file
            )
        client_tls: ssl.SSLContext | bool = True
        if tls.enabled(self.settings):
            client_tls = await asyncio.to_thread(tls.client_context, self.settings)
            if self.service in tls.INTERNAL_SERVICES:
                self._server_tls = await asyncio.to_thread(tls.server_context, self.settings)
        await self.config.start()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=client_tls), auto_decompress=False,
            middlewares=(self._credential.present,) if self._credential else (),
        )
        if self._credential is not None:
            self._credential.start()
        self.sock = bind(self.settings.host, self.settings.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.deregister()
        if self.session is not None:
            await self.session.close()
        await self.config.aclose()
        with contextlib.suppress(Exception):
            await self.etcd.close()
        if self.sock is not None:
            self.sock.close()
        if self._credential is not None:
            await self._credential.aclose()

    def update_record(self, role: str | None = None, **changes: Any) -> None:
        """Change fields of a published endpoint record (the node's own role by default)."""
        role = role or self.service
        self._changes.setdefault(role, {}).update(changes)
        registration = self._registrations.get(role)
        if registration is not None:
            registration.update(**changes)

    async def register(self, role: str, record: dict[str, Any]) -> None:
        """Publish `endpoints/{role}/{instance}` under a lease."""
        full = {"instance": self.instance, "http": self.http_url, **record,
                **self._changes.get(role, {})}
        key = f"{self.settings.etcd_prefix}endpoints/{role}/{self.instance}"
        registration = Registration(self.etcd, key, full)
        await registration.start()
        self._registrations[role] = registration

    async def deregister(self) -> None:
        registrations, self._registrations = self._registrations, {}
        for registration in registrations.values():
            await registration.aclose()

    def stop(self, *, hand_off: bool = False) -> None:
        """Ask `serve` to shut down: at once (SIGINT), or after handing its work off (SIGTERM,
        when `serve` was given a `handoff`)."""
        if self._stop is None or self._hurry is None:
            return
        if not hand_off:
            self._hurry.set()
        self._stop.set()

    def _hand_off_on_sigterm(self) -> None:
        self.stop(hand_off=True)

    def watch_health(self, *, pools: Iterable[LinkPool] = (),
                     postgres: Iterable[PostgresProbe] = ()) -> None:
        """Report these link pools and Postgres probes (with etcd) in `/metrics`."""
        self._pools.extend(pools)
        self._probes.extend(postgres)

    async def serve(
        self, app: web.Application, *, roles: dict[str, dict[str, Any]] | None = None,
        handoff: Callable[[], Awaitable[None]] | None = None,
        public: tuple[web.Application, socket.socket] | None = None,
    ) -> None:
        """Serve `app` until stopped; `roles` maps endpoint roles to their records.

        With `handoff`, SIGTERM marks the records draining and waits for `handoff()` (at most
        `handoff_timeout` seconds) before deregistering and draining. With `public`, that app
        is served on that socket too (a port shared by several processes): drained before
        `app`, which may serve the links it calls.
        """
        assert self.sock is not None and self._stop is not None
        if REGISTRY in app:
            app[REGISTRY].register(HealthCollector(self.config, self._pools, self._probes))
        runner = app_runner(app, drain_timeout=self.settings.drain_timeout)
        await runner.setup()
        await web.SockSite(runner, self.sock, ssl_context=self._server_tls,
                           backlog=LISTEN_BACKLOG).start()
        outer: web.AppRunner | None = None
        if public is not None:
            outer = app_runner(public[0], drain_timeout=self.settings.drain_timeout)
            await outer.setup()
            await web.SockSite(outer, public[1], backlog=LISTEN_BACKLOG).start()
        # What exists now (modules, clients, caches) lives as long as the process: move it out
        # of the cyclic collector's reach, or every full collection rescans it. Measured: the
        # OTLP exporter's imports alone (protobuf, requests) cost each service ~15 % more CPU
        # per request through those rescans, until this freeze (docs/PERFORMANCE.md).
        gc.freeze()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._hand_off_on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        parent = os.environ.get(PARENT_PID)
        watcher = asyncio.create_task(watch_parent(int(parent), self.stop)) if parent else None
        try:
            for role, record in (roles or {self.service: {}}).items():
                await self.register(role, record)
            log.info("%s %s serving on %s", self.service, self.instance, self.http_url)
            await self._stop.wait()
            if handoff is not None:
                await self._hand_off(handoff)
        finally:
            if watcher is not None:
                watcher.cancel()
            log.info("%s %s shutting down: deregister, drain, close", self.service, self.instance)
            await self.deregister()
            if outer is not None:
                await outer.cleanup()
            await runner.cleanup()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def _hand_off(self, handoff: Callable[[], Awaitable[None]]) -> None:
        """Mark every record draining (peers stop sending new work here) and keep serving
        until `handoff()` returns, `handoff_timeout` passes or a stop-now arrives."""
        assert self._hurry is not None
        if self._hurry.is_set():
            return
        for role in list(self._registrations):
            self.update_record(role, draining=True)
        log.info("%s %s draining: waiting up to %.0fs for a replacement", self.service,
                 self.instance, self.settings.handoff_timeout)
        waiter = asyncio.ensure_future(handoff())
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            done, _ = await asyncio.wait({waiter, hurry}, timeout=self.settings.handoff_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, hurry):
                task.cancel()
            await asyncio.gather(waiter, hurry, return_exceptions=True)
        if waiter in done and waiter.exception() is None:
            log.info("%s %s handed off", self.service, self.instance)
        elif waiter in done:
            log.warning("%s %s handoff failed: %r", self.service, self.instance,
                        waiter.exception())
        else:
            log.warning("%s %s: no replacement within %.0fs; stopping anyway", self.service,
                        self.instance, self.settings.handoff_timeout)


def app_runner(app: web.Application, *, drain_timeout: float) -> web.AppRunner:
    """The runner every service serves its app with.

    `handler_cancellation`: a client that closes its connection cancels its handler, so a
    request whose client gave up stops holding what it holds (quota slots, a place in a
    queue downstream: the cancellation travels down the links) instead of running on to its
    deadline.
    """
    return web.AppRunner(
        app, handle_signals=False, shutdown_timeout=drain_timeout, access_log=None,
        handler_cancellation=True,
    )
