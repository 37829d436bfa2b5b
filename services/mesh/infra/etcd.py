"""etcd for the data plane: a watched config cache and leased endpoint registration.

`ConfigCache` gets a prefix at revision R, then watches from R + 1. When the watch breaks
(etcd restarted, compaction) it resyncs with a fresh get and watches again; while etcd is
unreachable it keeps serving the last known config. `Registration` keeps one leased key alive
so peers find this instance and drop it when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import aetcd
import grpc
import orjson
from aetcd import exceptions, rpc, watcher

from services.mesh.domain.config import ConfigView, LocalConfig, StaticConfig

__all__ = [
    "ConfigCache", "ConfigView", "Registration", "StaticConfig", "connect_client", "redact_url",
]

log = logging.getLogger(__name__)

def connect_client(url: str) -> aetcd.Client:
    """An aetcd client for `http://[user:password@]host:port` (connects lazily on first use).

    With credentials it authenticates on connect and again whenever etcd stops honouring its
    token (a restarted etcd forgets every simple token; an idle one expires them)."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 2379
    if parts.username is None:
        return aetcd.Client(host=host, port=port, timeout=5)
    return _AuthenticatedClient(host=host, port=port, timeout=5, token=_EtcdToken(
        unquote(parts.username), unquote(parts.password or ""), timeout=5))


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, for logs and banners."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username}:***@"
    return parts._replace(netloc=userinfo + parts.netloc.rpartition("@")[2]).geturl()


_CANCEL_TIMEOUT = 2.0
"""Seconds to wait for etcd to confirm a watch's cancellation."""

_RETRY_FIRST, _RETRY_MAX = 0.2, 1.0
"""Seconds between a registration's tries while etcd does not answer: doubling, capped."""


class ConfigCache(LocalConfig):
    """A local, always-readable copy of every key under `prefix`, kept fresh by a watch."""

    def __init__(self, client: aetcd.Client, prefix: str) -> None:
        super().__init__()
        self._client = client
        self._prefix = prefix.encode()
        self._revision = 0
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Condition | None = None
        self.connected = False
        """True while the cache follows etcd; False while its watch is broken (it then serves
        the last config it saw)."""
        self.resyncs = 0
        """Full reads of the prefix: one at start, one after every broken watch."""

    @property
    def revision(self) -> int:
        """The etcd revision the cache reflects."""
        return self._revision

    async def start(self, *, connect_timeout: float = 30.0) -> None:
        """Load the prefix and start watching; raises if etcd stays unreachable that long."""
        self._changed = asyncio.Condition()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + connect_timeout
        while True:
            try:
                await self._resync()
                break
            except Exception as exc:
                if loop.time() >= give_up:
                    raise
                log.warning("etcd not reachable yet (%r); retrying", exc)
                await asyncio.sleep(0.5)
        self._task = asyncio.create_task(self._watch_forever(), name="etcd-config-watch")

    async def aclose(self) -> None:
        """Stop watching. Bounded: a watch whose cancel etcd never answers must not hang a
        service's shutdown (or a test) forever."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=_CANCEL_TIMEOUT * 2)
            self._task = None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until `predicate()` holds after some change; TimeoutError otherwise."""
        assert self._changed is not None, "start() the cache first"
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def _resync(self) -> None:
        self.resyncs += 1
        result = await self._client.get_prefix(self._prefix)
        fresh: dict[str, Any] = {}
        for kv in result:
            decoded = self._decode(kv.key, kv.value)
            if decoded is not None:
                fresh[decoded[0]] = decoded[1]
        self._values = fresh
        self._revision = result.header.revision
        self.connected = True
        await self._notify()

    async def _watch_forever(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd gone, compaction, stream reset: resync below
                self.connected = False
                log.warning("etcd watch on %s broke (%r); serving cached config", self._prefix, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            with contextlib.suppress(Exception):
                await self._resync()
                backoff = 0.05

    async def _watch_once(self) -> None:
        watch = await self._client.watch_prefix(self._prefix, start_revision=self._revision + 1)
        try:
            async for event in watch:
                key = event.kv.key.decode()[len(self._prefix) :]
                if event.kind == "DELETE":
                    self._values.pop(key, None)
                else:
                    decoded = self._decode(event.kv.key, event.kv.value)
                    if decoded is not None:
                        self._values[decoded[0]] = decoded[1]
                self._revision = max(self._revision, event.kv.mod_revision)
                await self._notify()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), _CANCEL_TIMEOUT)

    def _decode(self, raw_key: bytes, raw_value: bytes) -> tuple[str, Any] | None:
        key = raw_key.decode()[len(self._prefix) :]
        try:
            return key, orjson.loads(raw_value)
        except orjson.JSONDecodeError:
            log.error("ignoring etcd key %s: value is not JSON", raw_key.decode())
            return None

    async def _notify(self) -> None:
        self._call_listeners()
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()


class Registration:
    """One leased key (`endpoints/{service}/{instance}`) kept alive while this instance runs.

    The lease is refreshed every third of its TTL. It can lapse while the instance lives: etcd
    paused or unreachable for longer than the TTL expires it when it answers again and deletes
    the key. The registration then puts the record back at once: it watches its own key and
    re-publishes on a delete it did not cause, retries a failed refresh within a second
    (`_RETRY_FIRST` doubling to `_RETRY_MAX`) instead of a third of the TTL later, and grants
    a new lease as soon as etcd says the old one is gone. One warning per lapse.
    """

    def __init__(self, client: aetcd.Client, key: str, record: dict[str, Any], *, ttl: int = 10):
        self._client = client
        self._key = key.encode()
        self.record = dict(record)
        self._ttl = ttl
        self._lease: Any = None
        self._put_revision = 0
        self._lapsed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty: asyncio.Event | None = None

    async def start(self) -> None:
        """Grant the lease and publish the record."""
        self._dirty = asyncio.Event()
        await self._publish()
        self._tasks = [
            asyncio.create_task(self._keep_alive(), name="etcd-registration"),
            asyncio.create_task(self._watch_key(), name="etcd-registration-watch"),
        ]

    def update(self, **changes: Any) -> None:
        """Change fields of the record; published within a moment."""
        self.record.update(changes)
        if self._dirty is not None:
            self._dirty.set()

    async def aclose(self) -> None:
        """Deregister: stop refreshing and revoke the lease (which deletes the key)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Bounded, like ConfigCache.aclose: a watch cancel etcd never answers must not hang.
        if tasks:
            await asyncio.wait(tasks, timeout=_CANCEL_TIMEOUT * 2)
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.revoke_lease(self._lease.id), 2)
            self._lease = None

    async def _publish(self) -> None:
        if self._lease is None:
            self._lease = await self._client.lease(self._ttl)
        put = await self._client.put(self._key, orjson.dumps(self.record), lease=self._lease)
        self._put_revision = max(self._put_revision, put.header.revision)

    async def _keep_alive(self) -> None:
        assert self._dirty is not None
        retry: float | None = None  # after a failure: seconds until the next try
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), retry or self._ttl / 3)
            republish = self._dirty.is_set() or retry is not None
            self._dirty.clear()
            try:
                await self._refresh(republish=republish)
            except Exception as exc:
                self._lapse(f"refreshing it failed ({exc!r})")
                retry = _RETRY_FIRST if retry is None else min(retry * 2, _RETRY_MAX)
                continue
            retry = None
            if self._lapsed:
                self._lapsed = False
                log.info("endpoint %s registered again", self._key.decode())

    async def _refresh(self, *, republish: bool) -> None:
        if self._lease is not None:
            reply = await self._client.refresh_lease(self._lease.id)
            if reply is None or reply.TTL <= 0:
                self._lapse("its lease expired")
                self._lease = None
        if self._lease is None or republish:
            await self._publish()

    async def _watch_key(self) -> None:
        """Wake the keep-alive loop when the key is deleted behind this registration's back."""
        assert self._dirty is not None
        backoff = _RETRY_FIRST
        while True:
            try:
                watch = await self._client.watch(self._key, start_revision=self._put_revision + 1)
                try:
                    async for event in watch:
                        backoff = _RETRY_FIRST
                        if event.kind == "DELETE" and event.kv.mod_revision > self._put_revision:
                            self._lapse("its key was deleted")
                            self._dirty.set()
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watch.cancel(), _CANCEL_TIMEOUT)
            except aetcd.exceptions.RevisionCompactedError:
                self._dirty.set()  # a delete may hide in the compacted history: put anyway
            except Exception as exc:  # etcd away: watch again from the last put
                log.debug("watch on %s broke (%r)", self._key.decode(), exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_MAX)

    def _lapse(self, why: str) -> None:
        if not self._lapsed:
            self._lapsed = True
            log.warning("endpoint %s lapsed: %s; registering again", self._key.decode(), why)


_STALE_TOKEN = ("invalid auth token", "revision of auth store is old", "user name is empty")
"""etcd's answers to a token it no longer honours: authenticate again and retry once."""


class _EtcdToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc: no types
    """Puts a current etcd auth token on every unary call, taking a new one when etcd drops it.

    Streams (watch, lease keep-alive) carry the token aetcd passes them, which `on_token`
    keeps current: a stream broken by a stale token is reopened after a unary call renewed it.
    """

    def __init__(self, user: str, password: str, *, timeout: float) -> None:
        self._user, self._password, self._timeout = user, password, timeout
        self._token = ""
        self._auth: Any = None
        self.on_token: Callable[[str], None] = lambda token: None

    def bind(self, channel: grpc.aio.Channel) -> None:
        self._auth = rpc.AuthStub(channel)
        self._token = ""

    async def authenticate(self) -> None:
        request = rpc.AuthenticateRequest(name=self._user, password=self._password)
        self._token = (await self._auth.Authenticate(request, timeout=self._timeout)).token
        self.on_token(self._token)

    async def _details(self, details: Any) -> Any:
        if not self._token:
            await self.authenticate()
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "token"]
        return details._replace(metadata=[*metadata, ("token", self._token)])

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method
        if (method.decode() if isinstance(method, bytes) else method).endswith("/Authenticate"):
            return await continuation(details, request)
        try:
            return await (await continuation(await self._details(details), request))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED or not any(
                    stale in (exc.details() or "") for stale in _STALE_TOKEN):
                raise
        await self.authenticate()
        return await (await continuation(await self._details(details), request))


class _AuthenticatedClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client whose channel carries `_EtcdToken` (aetcd 1.0 authenticates once, at
    connect, and never again). `connect` mirrors aetcd's own, which it replaces."""

    def __init__(self, *, host: str, port: int, timeout: int, token: _EtcdToken) -> None:
        super().__init__(host=host, port=port, timeout=timeout)
        self._token = token
        token.on_token = self._use_token

    def _use_token(self, token: str) -> None:
        self.metadata = (("token", token),)
        stream: Any = self._watcher  # type: ignore[has-type]  # aetcd ships no types
        if stream is not None:
            stream._metadata = self.metadata

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            self.channel = grpc.aio.insecure_channel(
                f"{self._host}:{self._port}", options=list(self._options.items()),
                interceptors=[self._token])
            self._token.bind(self.channel)
            try:
                await self._token.authenticate()
            except grpc.aio.AioRpcError as exc:
                await self.channel.close()
                exceptions._handle_exception(exc)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
