"""A lean HTTP/1.1 keep-alive client for load generation: one pre-encoded request, reused.

aiohttp's client spends ~150-400 µs of CPU per request here, which on a 2-core machine steals
a large share of the server's CPU and shows up as client send lag. This client writes the same
pre-built request bytes on an idle keep-alive connection and parses only the status line and
Content-Length of the answer (~20-40 µs per request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from urllib.parse import urlsplit


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self._buffer[:end]).lower()
        length = _content_length(head)
        total = end + 4 + length
        if len(self._buffer) < total:
            return
        status, body = int(head[9:12]), bytes(self._buffer[end + 4 : total])
        del self._buffer[:total]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))
        self.transport = None


def _content_length(head: bytes) -> int:
    # Anchored at a line start, so Inference-Header-Content-Length does not match.
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    line_end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : line_end if line_end > 0 else None])


class RawClient:
    """POSTs one fixed body to one URL over a pool of keep-alive connections."""

    def __init__(
        self, url: str, body: bytes, *, content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        )
        self._request = head.encode() + body
        self._idle: list[_Connection] = []

    async def post(self) -> tuple[int, bytes]:
        """Send the request once; (status, body) of the answer."""
        connection = self._idle.pop() if self._idle else await self._connect()
        loop = asyncio.get_running_loop()
        connection.waiter = loop.create_future()
        assert connection.transport is not None
        connection.transport.write(self._request)
        answer = await connection.waiter
        if connection.transport is not None:
            self._idle.append(connection)
        return answer

    async def connect(self, count: int) -> None:
        """Open ``count`` idle connections now, so that a burst of ``count`` posts goes out in
        one pass of the loop rather than one handshake apart (``bench.cache``)."""
        self._idle += await asyncio.gather(*(self._connect() for _ in range(count)))

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_Connection, self._host, self._port)
        return connection

    def close(self) -> None:
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.close()
        self._idle.clear()
