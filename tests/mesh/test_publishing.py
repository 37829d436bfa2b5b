from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import orjson
import pytest

from services.mesh.infra.publishing import publish_newer


@pytest.fixture
def key(etcd_prefix: str) -> bytes:
    return f"{etcd_prefix}rollouts/iris".encode()


def record(epoch: int, primary: str = "1") -> dict[str, Any]:
    return {"model": "iris", "routes": [{"version": primary, "weight": 100.0}], "epoch": epoch}


async def read(etcd: aetcd.Client, key: bytes) -> Any:
    value = await etcd.get(key)
    return None if value is None else orjson.loads(value.value)


class RacingEtcd:
    """An etcd client where another writer puts `competitor` at `key` just before our first
    transaction; everything else goes straight to the real client."""

    def __init__(self, client: aetcd.Client, key: bytes, competitor: dict[str, Any]) -> None:
        self._client = client
        self._key = key
        self._competitor: bytes | None = orjson.dumps(competitor)
        self.transactions_run = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def transaction(self, compare: Any, success: Any, failure: Any) -> Any:
        if self._competitor is not None:
            value, self._competitor = self._competitor, None
            await self._client.put(self._key, value)
        self.transactions_run += 1
        return await self._client.transaction(compare=compare, success=success, failure=failure)


async def test_an_absent_key_is_created(etcd: aetcd.Client, key: bytes) -> None:
    assert await publish_newer(etcd, key, record(1), epoch=1)
    assert await read(etcd, key) == record(1)


@pytest.mark.parametrize(
    ("published", "wanted", "written"),
    [
        (record(3), record(3), False),  # already there
        (record(4), record(3), False),  # newer there
        (record(2), record(3), True),  # older there
        (record(3, "2"), record(3), True),  # same epoch, other content: replaced
        ({"model": "iris"}, record(3), True),  # no epoch: garbage
        ([1, 2], record(3), True),
    ],
)
async def test_only_an_older_or_different_record_is_replaced(
    etcd: aetcd.Client, key: bytes, published: Any, wanted: dict[str, Any], written: bool
) -> None:
    await etcd.put(key, orjson.dumps(published))
    before = (await etcd.get(key)).mod_revision
    assert await publish_newer(etcd, key, wanted, epoch=wanted["epoch"]) is written
    assert await read(etcd, key) == (wanted if written else published)
    assert ((await etcd.get(key)).mod_revision != before) is written


async def test_garbage_bytes_are_replaced(etcd: aetcd.Client, key: bytes) -> None:
    await etcd.put(key, b"not json{")
    assert await publish_newer(etcd, key, record(1), epoch=1)
    assert await read(etcd, key) == record(1)


@pytest.mark.parametrize("existing", [None, record(2)])
async def test_a_newer_record_written_mid_publish_is_not_overwritten(
    etcd: aetcd.Client, key: bytes, existing: dict[str, Any] | None
) -> None:
    if existing is not None:
        await etcd.put(key, orjson.dumps(existing))
    racing = RacingEtcd(etcd, key, competitor=record(7))
    assert not await publish_newer(racing, key, record(5), epoch=5)
    assert await read(etcd, key) == record(7)
    assert racing.transactions_run == 1  # lost the race, re-read, saw the newer record


async def test_an_older_record_written_mid_publish_is_retried_over(
    etcd: aetcd.Client, key: bytes
) -> None:
    racing = RacingEtcd(etcd, key, competitor=record(3))
    assert await publish_newer(racing, key, record(5), epoch=5)
    assert await read(etcd, key) == record(5)
    assert racing.transactions_run == 2


async def test_concurrent_writers_leave_the_newest_epoch(etcd: aetcd.Client, key: bytes) -> None:
    epochs = [3, 9, 12, 1, 7, 2, 11, 5]  # the newest is neither first nor last
    results = await asyncio.gather(
        *(publish_newer(etcd, key, record(e), epoch=e) for e in epochs)
    )
    assert await read(etcd, key) == record(12)
    assert results[epochs.index(12)]
