from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aetcd
import orjson
import pytest

from services.mesh.infra.etcd import ConfigCache, Registration, StaticConfig


@pytest.fixture
async def cache(etcd: aetcd.Client, etcd_prefix: str) -> AsyncIterator[ConfigCache]:
    config = ConfigCache(etcd, etcd_prefix)
    await config.start()
    try:
        yield config
    finally:
        await config.aclose()


async def put_json(etcd: aetcd.Client, key: str, value: object) -> None:
    await etcd.put(key.encode(), orjson.dumps(value))


async def test_start_loads_existing_keys(etcd: aetcd.Client, etcd_prefix: str) -> None:
    await put_json(etcd, f"{etcd_prefix}rollouts/resnet", {"model": "resnet"})
    await put_json(etcd, f"{etcd_prefix}models/resnet/1", {"version": "1"})
    await etcd.put(f"{etcd_prefix}models/broken/1".encode(), b"not json{")
    # A sibling prefix that merely starts with the same characters is not ours.
    await put_json(etcd, f"{etcd_prefix[:-1]}-other/rollouts/x", {"model": "x"})

    cache = ConfigCache(etcd, etcd_prefix)
    await cache.start()
    try:
        assert cache.get("rollouts/resnet") == {"model": "resnet"}
        assert cache.items("models/") == {"models/resnet/1": {"version": "1"}}
        assert cache.get("models/broken/1") is None
        assert cache.get("missing") is None
        assert cache.revision > 0
    finally:
        await cache.aclose()
        await etcd.delete_prefix(f"{etcd_prefix[:-1]}-other/".encode())


async def test_watch_applies_puts_and_deletes(
    etcd: aetcd.Client, etcd_prefix: str, cache: ConfigCache
) -> None:
    assert cache.items("") == {}
    await put_json(etcd, f"{etcd_prefix}tenants/acme", {"rate": 10})
    await cache.wait_for(lambda: cache.get("tenants/acme") == {"rate": 10}, timeout=5)

    await put_json(etcd, f"{etcd_prefix}tenants/acme", {"rate": 20})
    await cache.wait_for(lambda: cache.get("tenants/acme") == {"rate": 20}, timeout=5)
    revision = cache.revision

    await etcd.delete(f"{etcd_prefix}tenants/acme".encode())
    await cache.wait_for(lambda: cache.get("tenants/acme") is None, timeout=5)
    assert cache.items("tenants/") == {}
    assert cache.revision > revision


async def test_watch_ignores_values_that_are_not_json(
    etcd: aetcd.Client, etcd_prefix: str, cache: ConfigCache
) -> None:
    await etcd.put(f"{etcd_prefix}tenants/bad".encode(), b"\xff garbage")
    await put_json(etcd, f"{etcd_prefix}tenants/good", {"rate": 1})
    # Events arrive in order: once the later key is in, the bad one has been skipped.
    await cache.wait_for(lambda: cache.get("tenants/good") is not None, timeout=5)
    assert cache.items("tenants/") == {"tenants/good": {"rate": 1}}


async def test_listeners_are_called_after_each_change(
    etcd: aetcd.Client, etcd_prefix: str, cache: ConfigCache
) -> None:
    seen: list[object] = []
    changed = asyncio.Event()

    def listener() -> None:
        seen.append(cache.get("scale/resnet/1"))
        if cache.get("scale/resnet/1") == {"replicas": 3}:
            changed.set()

    def broken_listener() -> None:
        raise RuntimeError("a failing listener must not stop the others")

    cache.subscribe(broken_listener)
    cache.subscribe(listener)
    await put_json(etcd, f"{etcd_prefix}scale/resnet/1", {"replicas": 3})
    async with asyncio.timeout(5):
        await changed.wait()
    assert seen[-1] == {"replicas": 3}


async def test_wait_for_times_out_when_the_condition_never_holds(cache: ConfigCache) -> None:
    with pytest.raises(TimeoutError):
        await cache.wait_for(lambda: cache.get("never") is not None, timeout=0.05)


async def test_registration_publishes_updates_and_removes_a_leased_record(
    etcd: aetcd.Client, etcd_prefix: str, cache: ConfigCache
) -> None:
    key = f"{etcd_prefix}endpoints/worker/w1"
    registration = Registration(etcd, key, {"link": "ws://w1/link", "models": []}, ttl=10)
    await registration.start()
    try:
        stored = await etcd.get(key.encode())
        assert stored is not None
        assert orjson.loads(stored.value) == {"link": "ws://w1/link", "models": []}
        assert stored.lease != 0
        lease = await etcd.get_lease_info(stored.lease)
        assert 0 < lease.TTL <= 10

        registration.update(models=["resnet/1"])
        await cache.wait_for(
            lambda: cache.get("endpoints/worker/w1")
            == {"link": "ws://w1/link", "models": ["resnet/1"]},
            timeout=5,
        )
    finally:
        await registration.aclose()
    assert await etcd.get(key.encode()) is None
    await cache.wait_for(lambda: cache.get("endpoints/worker/w1") is None, timeout=5)


def test_static_config_notifies_on_put_and_delete() -> None:
    config = StaticConfig({"models/a/1": {"x": 1}})
    calls: list[dict[str, object]] = []
    config.subscribe(lambda: calls.append(config.items("models/")))
    config.put("models/b/1", {"x": 2})
    config.delete("models/a/1")
    assert calls == [
        {"models/a/1": {"x": 1}, "models/b/1": {"x": 2}},
        {"models/b/1": {"x": 2}},
    ]
    assert config.get("models/a/1") is None

