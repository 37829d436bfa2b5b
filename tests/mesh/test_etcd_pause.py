"""Discovery survives an etcd pause (issue 13, row 6).

etcd frozen with SIGSTOP for longer than a lease's TTL expires the lease when it resumes and
deletes the instance's key. The registration must put it back at once, and a pool that still
holds a healthy link to that instance must keep using it meanwhile: it is alive, etcd merely
forgot it. The pause tests freeze a private etcd of this module, never the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aetcd
import aiohttp
import orjson
import pytest

from deploy.localdeps import LocalEtcd, start_etcd
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import Unavailable
from services.mesh.infra.etcd import ConfigCache, Registration, connect_client
from services.mesh.transport.links import LinkClient
from services.mesh.transport.peers import LinkPool
from tests.credentials import CREDENTIAL
from tests.mesh.test_peers import Peer, serving
from tests.waiting import wait_for

TTL = 2
"""Lease TTL of the registrations under test (seconds): short, so a pause outlives it."""


@pytest.fixture(scope="module")
def private_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """An etcd of this module's own: freezing it must not stall any other test."""
    with start_etcd(tmp_path_factory.mktemp("etcd-pause"), fast=True) as etcd:
        yield etcd


@contextlib.contextmanager
def frozen(etcd: LocalEtcd) -> Iterator[None]:
    """etcd stopped (SIGSTOP) for the block; always resumed (SIGCONT) after it."""
    os.kill(etcd.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(etcd.pid, signal.SIGCONT)


class PickSampler:
    """Asks the pool for a link every 20 ms and after every pool change; counts refusals."""

    def __init__(self, pool: LinkPool) -> None:
        self._pool = pool
        self.samples = 0
        self.refusals: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self.samples += 1
        try:
            self._pool.pick()
        except Unavailable as exc:
            self.refusals.append(str(exc))

    async def __aenter__(self) -> PickSampler:
        self._pool.subscribe(self.sample)
        self._task = asyncio.create_task(self._every_20ms())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _every_20ms(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.02)  # the sampling rate (a load pattern), not a wait


@contextlib.asynccontextmanager
async def watched_pool(
    client: aetcd.Client, prefix: str, service: str
) -> AsyncIterator[tuple[ConfigCache, LinkPool]]:
    """What a gateway runs: a ConfigCache on the prefix and a LinkPool following it."""
    cache = ConfigCache(client, prefix)
    await cache.start()
    async with aiohttp.ClientSession() as session:
        pool = LinkPool(session, cache, service, credential=CREDENTIAL)
        pool.start()
        try:
            yield cache, pool
        finally:
            await pool.aclose()
            await cache.aclose()


async def test_pool_keeps_a_live_router_through_an_etcd_pause_that_outlives_its_lease(
    private_etcd: LocalEtcd,
) -> None:
    prefix = "/etcd-pause/"
    key = f"{prefix}endpoints/router/r1"
    # Three clients, as in the mesh: the router's, the gateway's and an observer's.
    router_etcd, gateway_etcd, observer = (connect_client(private_etcd.url) for _ in range(3))
    async with serving(Peer("r1")) as router:
        registration = Registration(
            router_etcd, key, {"instance": "r1", "link": router.url}, ttl=TTL
        )
        await registration.start()
        try:
            async with watched_pool(gateway_etcd, prefix, "router") as (cache, pool):
                before = await wait_for(
                    lambda: pool.links(), timeout=30, what="a link to the registered router"
                )
                link: LinkClient = before[0][0]
                first = await observer.get(key.encode())
                assert first is not None
                forgotten: list[float] = []  # when the gateway's cache lost the key

                def lost() -> None:
                    if cache.get("endpoints/router/r1") is None:
                        forgotten.append(time.monotonic())

                cache.subscribe(lost)

                async with PickSampler(pool) as sampler:
                    with frozen(private_etcd):
                        await asyncio.sleep(2 * TTL + 1)  # holding the fault: outlive the lease
                    # Once etcd answers, the registration re-puts within one retry step
                    # (<= 1 s) plus two RPCs; 10 s only bounds a failure on a busy machine.
                    back = await wait_for(
                        lambda: observer.get(key.encode()),
                        lambda kv: kv is not None and kv.lease != first.lease,
                        timeout=10, what="r1's key back in etcd under a new lease",
                    )
                    await wait_for(
                        lambda: (pool.peers, cache.get("endpoints/router/r1")),
                        lambda seen: seen[0] == 1 and seen[1] is not None,
                        timeout=30, what="the gateway's pool listing r1 again",
                    )

                assert forgotten, "the lease lapse never reached the gateway: nothing was tested"
                assert back is not None and orjson.loads(back.value)["link"] == router.url
                assert sampler.samples >= 50, sampler.samples
                assert sampler.refusals == [], (
                    f"{len(sampler.refusals)} of {sampler.samples} picks refused"
                )
                # The same link served throughout: the router was never dropped.
                assert pool.pick() is link and not link.closed
        finally:
            await registration.aclose()
            for client in (router_etcd, gateway_etcd, observer):
                await client.close()


@pytest.fixture
async def etcd(private_etcd: LocalEtcd) -> AsyncIterator[aetcd.Client]:
    client = connect_client(private_etcd.url)
    try:
        yield client
    finally:
        await client.close()


@pytest.mark.parametrize("lapse", ["key deleted", "lease revoked"])
async def test_registration_puts_its_key_back_at_once_when_it_disappears(
    etcd: aetcd.Client, lapse: str
) -> None:
    key = f"/registration-{lapse.replace(' ', '-')}/endpoints/router/r1".encode()
    # A long TTL: a registration that only noticed at its next refresh (a third of the TTL,
    # 20 s) would miss the 10 s deadline below by far.
    registration = Registration(etcd, key.decode(), {"instance": "r1", "link": "ws://r1"}, ttl=60)
    await registration.start()
    try:
        first = await etcd.get(key)
        assert first is not None
        if lapse == "key deleted":
            await etcd.delete(key)
        else:
            await etcd.revoke_lease(first.lease)
        back = await wait_for(
            lambda: etcd.get(key),
            lambda kv: kv is not None and kv.mod_revision > first.mod_revision,
            timeout=10, what=f"the key put back after its {lapse}",
        )
        assert orjson.loads(back.value) == {"instance": "r1", "link": "ws://r1"}
        lease = await etcd.get_lease_info(back.lease)
        assert 0 < lease.TTL <= 60
    finally:
        await registration.aclose()
    assert await etcd.get(key) is None


@contextlib.asynccontextmanager
async def static_pool(
    config: StaticConfig, *, orphan_grace: float = 60.0
) -> AsyncIterator[LinkPool]:
    async with aiohttp.ClientSession() as session:
        pool = LinkPool(session, config, "svc", credential=CREDENTIAL,
                        orphan_grace=orphan_grace)
        pool.start()
        try:
            yield pool
        finally:
            await pool.aclose()


def listing(peer: Peer) -> tuple[str, dict[str, Any]]:
    return f"endpoints/svc/{peer.name}", {"instance": peer.name, "link": peer.url}


def names(pool: LinkPool) -> set[str]:
    return {record["instance"] for _, record in pool.links()}


async def test_an_orphan_serves_until_its_link_closes() -> None:
    config = StaticConfig()
    async with serving(Peer("a")) as a, static_pool(config) as pool:
        config.put(*listing(a))
        [(link, _)] = await wait_for(pool.links, timeout=10, what="a link to a")
        config.delete(listing(a)[0])
        assert pool.pick() is link and pool.orphans == 1 and pool.peers == 0

        await a.server.aclose()  # the link breaks: an orphan is not reconnected
        await wait_for(lambda: pool.orphans, lambda n: n == 0, timeout=10, what="a dropped")
        assert link.closed
        with pytest.raises(Unavailable):
            pool.pick()


async def test_an_orphan_goes_when_its_grace_ends() -> None:
    config = StaticConfig()
    async with serving(Peer("a")) as a, static_pool(config, orphan_grace=0.3) as pool:
        config.put(*listing(a))
        [(link, _)] = await wait_for(pool.links, timeout=10, what="a link to a")
        config.delete(listing(a)[0])
        unlisted = time.monotonic()
        assert pool.pick() is link

        await wait_for(lambda: link.closed, timeout=10, what="the orphan's link closed")
        assert time.monotonic() - unlisted >= 0.3
        assert pool.links() == [] and pool.orphans == 0


async def test_an_orphan_whose_key_comes_back_is_a_peer_again_on_the_same_link() -> None:
    config = StaticConfig()
    async with serving(Peer("a")) as a, static_pool(config, orphan_grace=0.3) as pool:
        config.put(*listing(a))
        [(link, _)] = await wait_for(pool.links, timeout=10, what="a link to a")
        config.delete(listing(a)[0])
        config.put(*listing(a))
        assert pool.orphans == 0 and pool.peers == 1
        assert pool.pick() is link and not link.closed


async def test_orphans_stand_in_only_while_no_listed_peer_is_live() -> None:
    config = StaticConfig()
    async with serving(Peer("a")) as a, serving(Peer("b")) as b, static_pool(config) as pool:
        config.put(*listing(a))
        config.put(*listing(b))
        await wait_for(lambda: names(pool), lambda seen: seen == {"a", "b"}, timeout=10,
                       what="links to a and b")
        [(link_a, _)] = [(k, r) for k, r in pool.links() if r["instance"] == "a"]
        [(link_b, _)] = [(k, r) for k, r in pool.links() if r["instance"] == "b"]

        # b is listed and live: a's key going closes a's link, as before (no orphan).
        config.delete(listing(a)[0])
        assert names(pool) == {"b"} and pool.orphans == 0
        await wait_for(lambda: link_a.closed, timeout=10, what="a's link closed")

        # b's key going too: b is the last one standing and keeps serving, every key with it.
        config.delete(listing(b)[0])
        assert pool.orphans == 1 and names(pool) == {"b"}
        assert {pool.pick_by_key(f"model-{i}") for i in range(20)} == {link_b}

        # a listed again: b stays until a's new link is open, then goes.
        config.put(*listing(a))
        assert pool.pick() is link_b  # a's new link is not open yet
        await wait_for(lambda: names(pool), lambda seen: seen == {"a"}, timeout=10,
                       what="a back, b dropped")
        assert pool.orphans == 0
        await wait_for(lambda: link_b.closed, timeout=10, what="b's link closed")
