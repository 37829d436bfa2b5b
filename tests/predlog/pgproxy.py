"""A TCP forwarder to make a database reachable or unreachable on demand, in-process."""

from __future__ import annotations

import asyncio
import contextlib

from deploy.localdeps import free_port


class Gate:
    """Listens on `port` (only while open) and forwards every connection to `target_port`.

    Closed, a connection to `port` is refused, as with a database that is down.
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def close(self) -> None:
        """Stop listening and cut every forwarded connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for pipe in set(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _forward(self, client_in: asyncio.StreamReader,
                       client_out: asyncio.StreamWriter) -> None:
        try:
            server_in, server_out = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            client_out.close()
            return
        for source, sink in ((client_in, server_out), (server_in, client_out)):
            pipe = asyncio.create_task(_pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass  # the other side went away
    finally:
        sink.close()
        with contextlib.suppress(Exception):
            await sink.wait_closed()
