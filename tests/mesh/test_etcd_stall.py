"""A config cache whose watch stalls without an error still catches up (2026-12-07).

After the fault group paused, killed and restarted etcd, a batcher's watch stopped delivering
and never broke: a worker that registered afterwards was never linked. These tests stall the
cache's first watch on purpose, in the two shapes such a stall takes in aetcd (a watch that
is created and then delivers nothing, a watch whose creation never returns), against a real
etcd, and expect the cache to notice, catch up and watch again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aetcd
import orjson
import pytest
from aetcd import rtypes

from services.mesh.infra.etcd import ConfigCache, connect_client

CHECK = 0.2
"""The caches' freshness interval here (seconds): short, so a stall shows quickly."""

Watching = Callable[..., Awaitable[Any]]


async def _forever() -> None:
    await asyncio.Event().wait()


async def _nothing() -> None:
    return None


async def _silent_events() -> AsyncIterator[rtypes.Event]:
    await _forever()
    yield  # pragma: no cover  # never reached: the watch delivers nothing


def quiet_watch(watch_prefix: Watching) -> Watching:
    """`watch_prefix` whose first watch is created but never delivers an event."""
    calls = 0

    async def watch(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return rtypes.Watch(_silent_events, _nothing, 0)
        return await watch_prefix(*args, **kwargs)
    return watch


def hung_watch(watch_prefix: Watching) -> Watching:
    """`watch_prefix` whose first call never returns (a watch stream that takes no request)."""
    calls = 0

    async def watch(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await _forever()
        return await watch_prefix(*args, **kwargs)
    return watch


@pytest.mark.parametrize("stall", [quiet_watch, hung_watch], ids=["quiet", "hung"])
async def test_a_cache_whose_watch_stalls_catches_up_and_follows_etcd_again(
    etcd_url: str, etcd: aetcd.Client, etcd_prefix: str, stall: Callable[[Watching], Watching],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    client = connect_client(etcd_url)
    monkeypatch.setattr(client, "watch_prefix", stall(client.watch_prefix))
    cache = ConfigCache(client, etcd_prefix, freshness_interval=CHECK)
    await cache.start()
    try:
        await etcd.put(f"{etcd_prefix}endpoints/worker/b".encode(), orjson.dumps({"n": 1}))
        with caplog.at_level(logging.WARNING, logger="services.mesh.infra.etcd"):
            await cache.wait_for(lambda: cache.get("endpoints/worker/b") == {"n": 1}, 15)
        assert "endpoints/worker/b" in caplog.text, "the stall went unreported"
        resyncs = cache.resyncs
        await etcd.put(f"{etcd_prefix}endpoints/worker/b".encode(), orjson.dumps({"n": 2}))
        await cache.wait_for(lambda: cache.get("endpoints/worker/b") == {"n": 2}, 15)
        assert cache.resyncs == resyncs, "the second change came by a resync, not the watch"
    finally:
        await cache.aclose()
        await client.close()
