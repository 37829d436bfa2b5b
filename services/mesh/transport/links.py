"""Persistent multiplexed links between service instances over aiohttp WebSockets.

One link per (caller instance, callee instance) carries many calls at once as binary frames
(see `frames`). Frames queued in the same loop iteration leave together (`outbox`): back to
back in WebSocket messages of at most `coalesce_bytes`, so a busy link costs one write per
iteration rather than one per request. A link that breaks fails its in-flight calls at once
with `LinkClosed`; `LinkPool` reconnects while the peer is listed in etcd and forgets it when
its leased key disappears.

No WebSocket heartbeat: aiohttp's per-message heartbeat bookkeeping cost ~80 µs per round trip
here. A crashed peer closes its TCP connection (the link fails at once); a vanished host loses
its etcd lease within its TTL (the pool drops it); a hung peer is caught by call deadlines.

Links are internal surfaces: a server refuses the WebSocket upgrade (401) unless the caller
presents the mesh credential (`auth`), and a message larger than `max_frame_bytes` closes its
link (logged); other links are unaffected. A sender never writes one: a frame that large fails
its own call instead (InvalidInput for a request, InternalError for a reply). The limit must be
at least the largest valid batch: the bound on max_batch_size times the bytes of a row, plus a
little for frame headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.mesh.domain import trust
from services.mesh.domain.errors import (
    DeadlineExceeded,
    InfermeshError,
    InternalError,
    InvalidInput,
    LinkClosed,
    from_wire,
)
from services.mesh.transport import frames
from services.mesh.transport.auth import AUTHORIZATION, Credential, bearer, unauthorized
from services.mesh.transport.outbox import DEFAULT_COALESCE_BYTES, Outbox, coalesce_limit
from services.mesh.transport.rest import add_metrics_route

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME_BYTES = trust.DEFAULT_MAX_FRAME_BYTES
"""The default of the `max_frame_bytes` setting: the largest link message accepted."""
Handler = Callable[[dict[str, Any], memoryview], Awaitable[tuple[dict[str, Any], frames.Buffers]]]


class LinkServer:
    """Serves links on an aiohttp route: `app.router.add_get("/link", server.handle)`."""

    def __init__(
        self, handler: Handler, *, name: str, credential: Credential,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        coalesce_bytes: int = DEFAULT_COALESCE_BYTES,
    ) -> None:
        self._handler = handler
        self._name = name
        self._credential = credential
        self._max_frame_bytes = max_frame_bytes
        self._coalesce_bytes = coalesce_limit(coalesce_bytes, max_frame_bytes)
        self._sockets: set[web.WebSocketResponse] = set()
        self._links: list[dict[int, asyncio.Task[None]]] = []
        """The calls in progress on each open link."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self._credential.accepts(request.headers.get(AUTHORIZATION)):
            log.warning("%s refused a link from %s without the mesh credential", self._name,
                        request.remote)
            return unauthorized()
        ws = web.WebSocketResponse(max_msg_size=self._max_frame_bytes, compress=False)
        await ws.prepare(request)
        self._sockets.add(ws)
        outbox = Outbox(
            ws, limit=self._coalesce_bytes, max_frame_bytes=self._max_frame_bytes,
            refuse=lambda _, call_id, size: self._refuse(outbox, call_id, size),
        )
        calls: dict[int, asyncio.Task[None]] = {}
        self._links.append(calls)
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.ERROR:
                    log.error("%s closes a link from %s: %r", self._name, request.remote,
                              ws.exception())
                    break
                if message.type != aiohttp.WSMsgType.BINARY:
                    continue
                for frame in frames.unpack(message.data):
                    self._dispatch(frame, calls, outbox)
        finally:
            for task in list(calls.values()):
                task.cancel()
            self._links.remove(calls)
            self._sockets.discard(ws)
            await outbox.aclose()
        return ws

    def _dispatch(
        self, frame: frames.Frame, calls: dict[int, asyncio.Task[None]], outbox: Outbox
    ) -> None:
        if frame.kind == frames.CANCEL:
            task = calls.pop(frame.call_id, None)  # a task cancelled unstarted never runs
            if task is not None:
                task.cancel()
            return
        # The call forgets itself when it ends (no done callback: one loop callback fewer per
        # call); `calls` is this link's, `_links` holds every link's for `drain`.
        calls[frame.call_id] = asyncio.create_task(self._answer(frame, outbox, calls))

    async def _answer(
        self, frame: frames.Frame, outbox: Outbox, calls: dict[int, asyncio.Task[None]]
    ) -> None:
        try:
            meta, buffers = await self._handler(frame.meta, frame.payload)
            outbox.send(frames.pack(frames.REPLY, frame.call_id, meta, buffers))
        except InfermeshError as exc:
            outbox.send(frames.pack(frames.ERROR, frame.call_id, exc.to_wire()))
        except Exception as exc:
            log.exception("%s failed a link call", self._name)
            error = InternalError(f"{self._name} failed: {type(exc).__name__}: {exc}")
            outbox.send(frames.pack(frames.ERROR, frame.call_id, error.to_wire()))
        finally:
            calls.pop(frame.call_id, None)

    def _refuse(self, outbox: Outbox, call_id: int, size: int) -> None:
        """A reply too large for the caller fails that call alone (a server sends no other
        frame that large)."""
        log.warning("%s refused a %d-byte reply over max_frame_bytes", self._name, size)
        error = InternalError(
            f"{self._name}: a reply of {size} bytes is over the link's max_frame_bytes "
            f"({self._max_frame_bytes})"
        )
        outbox.send(frames.pack(frames.ERROR, call_id, error.to_wire()))

    async def drain(self, timeout: float) -> None:
        """Wait (up to `timeout`) for calls in progress to answer."""
        calls = {task for link in self._links for task in link.values()}
        if calls:
            await asyncio.wait(calls, timeout=timeout)

    async def aclose(self) -> None:
        """Close every open link (callers see LinkClosed for anything still pending)."""
        for ws in list(self._sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"shutting down")


class LinkClient:
    """The calling end of one link."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, *, peer: str, credential: Credential,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        coalesce_bytes: int = DEFAULT_COALESCE_BYTES,
    ) -> None:
        self.url = url
        self.peer = peer
        self._session = session
        self._credential = credential
        self._max_frame_bytes = max_frame_bytes
        self._coalesce_bytes = coalesce_limit(coalesce_bytes, max_frame_bytes)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._outbox: Outbox | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[frames.Frame]] = {}
        self._ids = itertools.count(1)
        self._closed = asyncio.Event()

    @property
    def inflight(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def connect(self) -> None:
        """Open the WebSocket; raises LinkClosed when the peer cannot be reached."""
        try:
            self._ws = await self._session.ws_connect(
                self.url, max_msg_size=self._max_frame_bytes, compress=0,
                headers=bearer(self._credential),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._closed.set()
            raise LinkClosed(f"cannot open a link to {self.peer} at {self.url}: {exc}") from exc
        self._outbox = Outbox(
            self._ws, limit=self._coalesce_bytes, max_frame_bytes=self._max_frame_bytes,
            refuse=self._refuse,
        )
        self._reader = asyncio.create_task(self._read(), name=f"link-reader-{self.peer}")

    async def call(
        self, meta: dict[str, Any], buffers: frames.Buffers, *, timeout: float | None = None
    ) -> frames.Frame:
        """Send one call and wait for its reply; raises the peer's error as our own."""
        if self._closed.is_set() or self._outbox is None:
            raise LinkClosed(f"link to {self.peer} is closed")
        if timeout is not None and timeout <= 0:
            # Never start work the caller can no longer use.
            raise DeadlineExceeded(f"deadline exceeded before calling {self.peer}")
        call_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[frames.Frame] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._outbox.send(frames.pack(frames.CALL, call_id, meta, buffers))
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                max(timeout, 0.0), self._expire, call_id
            )
        try:
            frame = await future
        except asyncio.CancelledError:
            if not self._closed.is_set():
                self._outbox.send(frames.pack(frames.CANCEL, call_id, {}))
            raise
        finally:
            self._pending.pop(call_id, None)
            if timer is not None:
                timer.cancel()
        if frame.kind == frames.ERROR:
            raise from_wire(frame.meta)
        return frame

    def _refuse(self, kind: int, call_id: int, size: int) -> None:
        """A call too large for the peer fails alone, before it is sent (a CANCEL is tiny)."""
        future = self._pending.pop(call_id, None)
        if future is not None and not future.done():
            future.set_exception(InvalidInput(
                f"a request of {size} bytes to {self.peer} is over the link's max_frame_bytes "
                f"({self._max_frame_bytes})"
            ))

    def _expire(self, call_id: int) -> None:
        future = self._pending.pop(call_id, None)
        if future is not None and not future.done():
            future.set_exception(DeadlineExceeded(f"deadline exceeded waiting for {self.peer}"))
            if self._outbox is not None and not self._closed.is_set():
                self._outbox.send(frames.pack(frames.CANCEL, call_id, {}))

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                if message.type == aiohttp.WSMsgType.ERROR:
                    log.error("link to %s closes: %r", self.peer, self._ws.exception())
                    break
                if message.type != aiohttp.WSMsgType.BINARY:
                    continue
                for frame in frames.unpack(message.data):
                    future = self._pending.pop(frame.call_id, None)
                    if future is not None and not future.done():
                        future.set_result(frame)
        except Exception as exc:
            log.warning("link to %s failed: %r", self.peer, exc)
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        self._closed.set()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    LinkClosed(f"link to {self.peer} closed with the request in flight")
                )

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._outbox is not None:
            await self._outbox.aclose()
        self._fail_pending()


def create_link_app(
    server: LinkServer, registry: CollectorRegistry, *, drain_timeout: float = 10.0
) -> web.Application:
    """An app serving `/link`, `/metrics` and `/healthz` that drains its links on shutdown."""
    app = web.Application()
    app.router.add_get("/link", server.handle)
    app.router.add_get("/healthz", _healthz)
    add_metrics_route(app, registry)

    async def drain(_: web.Application) -> None:
        await server.drain(timeout=drain_timeout)
        await server.aclose()

    app.on_shutdown.append(drain)
    return app


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")
