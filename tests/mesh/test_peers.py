from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aetcd
import aiohttp
import orjson
import pytest
from aiohttp import web

from services.mesh.domain.errors import Unavailable
from services.mesh.infra.etcd import ConfigCache
from services.mesh.transport import frames
from services.mesh.transport.links import LinkClient, LinkServer
from services.mesh.transport.peers import LinkPool
from tests.credentials import CREDENTIAL


class Peer:
    """A real link server that answers with its own name, or holds calls until released."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = LinkServer(self.handle, name=name, credential=CREDENTIAL)
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.url = ""

    async def handle(
        self, meta: dict[str, Any], payload: memoryview
    ) -> tuple[dict[str, Any], frames.Buffers]:
        if meta.get("hold"):
            self.held.set()
            await self.release.wait()
        return {"peer": self.name}, []


@contextlib.asynccontextmanager
async def serving(peer: Peer) -> AsyncIterator[Peer]:
    app = web.Application()
    app.router.add_get("/link", peer.server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    peer.url = f"ws://127.0.0.1:{runner.addresses[0][1]}/link"
    try:
        yield peer
    finally:
        peer.release.set()
        await peer.server.aclose()
        await runner.cleanup()


@pytest.fixture
async def pool(etcd: aetcd.Client, etcd_prefix: str) -> AsyncIterator[LinkPool]:
    cache = ConfigCache(etcd, etcd_prefix)
    await cache.start()
    async with aiohttp.ClientSession() as session:
        links = LinkPool(session, cache, "svc", credential=CREDENTIAL)
        links.start()
        try:
            yield links
        finally:
            await links.aclose()
            await cache.aclose()


@pytest.fixture
async def peers() -> AsyncIterator[tuple[Peer, Peer]]:
    async with serving(Peer("a")) as a, serving(Peer("b")) as b:
        yield a, b


async def register(etcd: aetcd.Client, prefix: str, peer: Peer) -> None:
    record = {"instance": peer.name, "link": peer.url}
    await etcd.put(f"{prefix}endpoints/svc/{peer.name}".encode(), orjson.dumps(record))


async def until(pool: LinkPool, predicate: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until `predicate()` holds after some pool change."""
    ready = asyncio.Event()

    def check() -> None:
        if predicate():
            ready.set()

    pool.subscribe(check)
    check()
    async with asyncio.timeout(5):
        await ready.wait()


def names(pool: LinkPool) -> set[str]:
    return {record["instance"] for _, record in pool.links()}


def link_of(pool: LinkPool, name: str) -> LinkClient:
    [link] = [link for link, record in pool.links() if record["instance"] == name]
    return link


async def answer(link: LinkClient) -> str:
    frame = await link.call({}, [])
    return str(frame.meta["peer"])


async def test_pool_opens_a_link_to_every_registered_peer(
    etcd: aetcd.Client, etcd_prefix: str, pool: LinkPool, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    await register(etcd, etcd_prefix, a)
    await register(etcd, etcd_prefix, b)
    # A record without a link URL is not a peer.
    await etcd.put(f"{etcd_prefix}endpoints/svc/c".encode(), orjson.dumps({"instance": "c"}))
    await until(pool, lambda: names(pool) == {"a", "b"})
    assert await answer(link_of(pool, "a")) == "a"
    assert await answer(link_of(pool, "b")) == "b"
    assert {r["link"] for _, r in pool.links()} == {a.url, b.url}


async def test_deleting_the_key_closes_and_forgets_the_link(
    etcd: aetcd.Client, etcd_prefix: str, pool: LinkPool, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    await register(etcd, etcd_prefix, a)
    await register(etcd, etcd_prefix, b)
    await until(pool, lambda: names(pool) == {"a", "b"})
    link_b = link_of(pool, "b")

    await etcd.delete(f"{etcd_prefix}endpoints/svc/b".encode())
    await until(pool, lambda: names(pool) == {"a"})
    async with asyncio.timeout(5):
        await link_b.wait_closed()
    assert link_b.closed
    assert await answer(pool.pick()) == "a"


async def test_pool_reconnects_while_the_peer_stays_listed(
    etcd: aetcd.Client, etcd_prefix: str, pool: LinkPool, peers: tuple[Peer, Peer]
) -> None:
    a, _ = peers
    await register(etcd, etcd_prefix, a)
    await until(pool, lambda: names(pool) == {"a"})
    first = link_of(pool, "a")

    await a.server.aclose()  # the link breaks; the key stays
    await until(pool, lambda: names(pool) == {"a"} and link_of(pool, "a") is not first)
    assert first.closed
    assert await answer(link_of(pool, "a")) == "a"


async def test_pick_prefers_the_link_with_fewest_calls_in_flight(
    etcd: aetcd.Client, etcd_prefix: str, pool: LinkPool, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    await register(etcd, etcd_prefix, a)
    await register(etcd, etcd_prefix, b)
    await until(pool, lambda: names(pool) == {"a", "b"})

    held = asyncio.create_task(link_of(pool, "a").call({"hold": True}, []))
    async with asyncio.timeout(5):
        await a.held.wait()
    assert link_of(pool, "a").inflight == 1
    for _ in range(3):
        assert await answer(pool.pick()) == "b"
    assert pool.pick(lambda record: record["instance"] == "a") is link_of(pool, "a")
    with pytest.raises(Unavailable, match="svc"):
        pool.pick(lambda record: False)

    a.release.set()
    assert (await held).meta == {"peer": "a"}


async def test_pick_by_key_is_stable_and_spreads_keys(
    etcd: aetcd.Client, etcd_prefix: str, pool: LinkPool, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    await register(etcd, etcd_prefix, a)
    await register(etcd, etcd_prefix, b)
    await until(pool, lambda: names(pool) == {"a", "b"})

    keys = [f"model-{i}" for i in range(40)]
    chosen = {key: pool.pick_by_key(key) for key in keys}
    assert all(pool.pick_by_key(key) is chosen[key] for key in keys)
    assert set(chosen.values()) == {link_of(pool, "a"), link_of(pool, "b")}

    # Keys that went to the surviving peer stay there when the other one leaves.
    on_a = [key for key in keys if chosen[key] is link_of(pool, "a")]
    await etcd.delete(f"{etcd_prefix}endpoints/svc/b".encode())
    await until(pool, lambda: names(pool) == {"a"})
    assert all(pool.pick_by_key(key) is chosen[key] for key in on_a)
    assert all(pool.pick_by_key(key) is link_of(pool, "a") for key in keys)


async def test_no_peers_is_unavailable(pool: LinkPool) -> None:
    assert pool.links() == []
    with pytest.raises(Unavailable, match="no live svc instance"):
        pool.pick()
    with pytest.raises(Unavailable, match="no live svc instance"):
        pool.pick_by_key("resnet")
