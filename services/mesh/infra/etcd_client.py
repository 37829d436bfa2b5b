"""The aetcd client every service holds: authenticated, quick to reconnect, its watch stream
replaceable.

aetcd 1.0 authenticates once, at connect, and never again; backs off as gRPC does by default
(up to 120 s between connection attempts); and keeps one watch stream per client that it
replaces only when gRPC reports it broken. Each is too little for a mesh whose etcd restarts:
`connect_client` builds a client that renews its token, reconnects within a second of etcd's
return, and whose watch stream `reopen_watch_stream` replaces on demand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import aetcd
import grpc
from aetcd import exceptions, rpc, watcher

__all__ = ["connect_client", "redact_url", "reopen_watch_stream"]

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 2.0
"""Seconds to wait for a replaced watch stream to end its watches."""

_RECONNECT_BACKOFF = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}
"""gRPC's defaults back off up to 120 s between connection attempts: after an outage of
seconds a service would find etcd back only several seconds after it returned."""


def connect_client(url: str) -> aetcd.Client:
    """An aetcd client for `http://[user:password@]host:port` (connects lazily on first use).

    With credentials it authenticates on connect and again whenever etcd stops honouring its
    token (a restarted etcd forgets every simple token; an idle one expires them)."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 2379
    if parts.username is None:
        return aetcd.Client(host=host, port=port, timeout=5, options=dict(_RECONNECT_BACKOFF))
    return _AuthenticatedClient(host=host, port=port, timeout=5, token=_EtcdToken(
        unquote(parts.username), unquote(parts.password or ""), timeout=5),
        options=dict(_RECONNECT_BACKOFF))


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, for logs and banners."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username}:***@"
    return parts._replace(netloc=userinfo + parts.netloc.rpartition("@")[2]).geturl()


async def reopen_watch_stream(client: aetcd.Client) -> None:
    """Give `client` a new watch stream, opened with its current token on first use, and end
    the watches of the old one (their owners watch again, on the new one).

    aetcd keeps one stream per client and replaces it only when gRPC reports it broken; a
    stream that stalls without breaking would hold every later watch of the client."""
    old: Any = client._watcher
    if old is None or client.channel is None:
        return
    client._watcher = watcher.Watcher(rpc.WatchStub(client.channel), timeout=client._timeout,
                                      metadata=client.metadata)
    try:
        await asyncio.wait_for(old.shutdown(), _CLOSE_TIMEOUT)
    except Exception as exc:  # a wedged stream: drop it without its goodbyes
        log.debug("closing a stalled etcd watch stream failed (%r)", exc)
        if old._request_handler is not None:
            old._request_handler.cancel()


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

    def __init__(self, *, host: str, port: int, timeout: int, token: _EtcdToken,
                 options: dict[str, Any]) -> None:
        super().__init__(host=host, port=port, timeout=timeout, options=options)
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
