"""A link whose peer goes away fails its calls at once, and comes back when the peer does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from deploy.localdeps import free_port
from services.mesh.domain.errors import LinkClosed
from services.mesh.infra.etcd import ConfigCache, connect_client
from services.mesh.transport.links import LinkServer, create_link_app
from services.mesh.transport.peers import LinkPool
from tests.credentials import CREDENTIAL


async def _serve(port: int, release: asyncio.Event) -> web.AppRunner:
    async def handler(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
        if meta.get("block"):
            await release.wait()
        return {"echo": meta.get("n")}, []

    server = LinkServer(handler, name="peer", credential=CREDENTIAL)
    app = create_link_app(server, CollectorRegistry(), drain_timeout=0.05)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _until(predicate: Callable[[], bool], *, wake: Callable[[Callable[[], None]], None],
                 timeout: float = 10.0) -> None:
    changed = asyncio.Event()
    wake(changed.set)
    async with asyncio.timeout(timeout):
        while not predicate():
            await changed.wait()
            changed.clear()


async def test_pool_fails_inflight_calls_and_reconnects(etcd_url: str, etcd_prefix: str) -> None:
    port, release = free_port(), asyncio.Event()
    runner = await _serve(port, release)
    client = connect_client(etcd_url)
    record = {"instance": "a", "link": f"ws://127.0.0.1:{port}/link"}
    await client.put(f"{etcd_prefix}endpoints/peer/a".encode(), orjson.dumps(record))
    cache = ConfigCache(client, etcd_prefix)
    await cache.start()
    async with aiohttp.ClientSession() as session:
        pool = LinkPool(session, cache, "peer", credential=CREDENTIAL)
        pool.start()
        try:
            await _until(lambda: bool(pool.links()), wake=pool.subscribe)
            blocked = asyncio.create_task(pool.pick().call({"block": True}, []))
            await asyncio.sleep(0)  # let the call leave before the peer goes away
            await runner.cleanup()
            async with asyncio.timeout(5):
                with pytest.raises(LinkClosed, match="closed with the request in flight"):
                    await blocked
            runner = await _serve(port, release)
            await _until(lambda: bool(pool.links()), wake=pool.subscribe)
            answer = await pool.pick().call({"n": 7}, [], timeout=5)
            assert answer.meta == {"echo": 7}
        finally:
            release.set()
            await pool.aclose()
            await runner.cleanup()
            await cache.aclose()
            await client.close()


