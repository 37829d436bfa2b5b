"""An aiohttp app served on loopback from its own thread and event loop, so that schemathesis
(whose calls are synchronous) can drive it from a plain test without blocking a loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager

import uvloop
from aiohttp import web

AppFactory = Callable[[], AbstractAsyncContextManager[web.Application]]
"""Opens what the app needs (pools, watches) on the serving loop, yields the app, closes."""

START_TIMEOUT = 60.0


@contextmanager
def serve_in_thread(factory: AppFactory) -> Iterator[str]:
    """Serve the app `factory` opens on 127.0.0.1 (a free port); its base URL."""
    loop = uvloop.new_event_loop()
    started: asyncio.Future[str] = loop.create_future()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete,
                              args=(_serve(factory, started, stop),), daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(_wait(started), loop).result(START_TIMEOUT)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(START_TIMEOUT)
        if not thread.is_alive():
            loop.close()


async def _wait(started: asyncio.Future[str]) -> str:
    return await started


async def _serve(factory: AppFactory, started: asyncio.Future[str], stop: asyncio.Event) -> None:
    try:
        async with factory() as app, _running(app) as url:
            started.set_result(url)
            await stop.wait()
    except BaseException as exc:
        if not started.done():
            started.set_exception(exc)
        raise


@asynccontextmanager
async def _running(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
