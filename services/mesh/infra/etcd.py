"""etcd for the data plane: a watched config cache and leased endpoint registration.

`ConfigCache` gets a prefix at revision R, then watches from R + 1. When the watch breaks
(etcd restarted, compaction) it resyncs with a fresh get and watches again; while etcd is
unreachable it keeps serving the last known config. A watch can also stall without breaking
(see `etcd_freshness`): a watch etcd does not create in time, or a cache that a periodic read
of the prefix shows behind, gets the client a new watch stream, a resync and a new watch.
`Registration` keeps one leased key alive so peers find this instance and drop it when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aetcd
import orjson
from aetcd import exceptions

from services.mesh.domain.config import ConfigView, LocalConfig, StaticConfig
from services.mesh.infra.etcd_client import connect_client, redact_url, reopen_watch_stream
from services.mesh.infra.etcd_freshness import IN_FLIGHT_GRACE, deletes_to_keep, unseen_changes

__all__ = [
    "ConfigCache", "ConfigView", "Registration", "StaticConfig", "connect_client", "redact_url",
]

log = logging.getLogger(__name__)

_CANCEL_TIMEOUT = 2.0
"""Seconds to wait for etcd to confirm a watch's cancellation."""

_CREATE_TIMEOUT = 10.0
"""Seconds a new watch may take to be created (aetcd's own bound, 5 s, covers only the wait
for etcd's answer, not the wait for its shared stream)."""

FRESHNESS_INTERVAL = 5.0
"""Seconds between a cache's reads of its prefix that check the watch still delivers."""


class _WatchStalled(Exception):
    """The watch delivers nothing although etcd answers: a new stream is needed."""


_RETRY_FIRST, _RETRY_MAX = 0.2, 1.0
"""Seconds between a registration's tries while etcd does not answer: doubling, capped."""


class ConfigCache(LocalConfig):
    """A local, always-readable copy of every key under `prefix`, kept fresh by a watch that
    a keys-only read of the prefix every `freshness_interval` seconds checks."""

    def __init__(
        self, client: aetcd.Client, prefix: str, *, freshness_interval: float = FRESHNESS_INTERVAL,
    ) -> None:
        super().__init__()
        self._client = client
        self._prefix = prefix.encode()
        self._freshness_interval = freshness_interval
        self._revision = 0
        self._applied: dict[str, int] = {}
        """Each key's revision of the last put the cache applied (JSON or not)."""
        self._deleted: dict[str, int] = {}
        """Each key's revision of the last delete the cache applied, while a check needs it."""
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Condition | None = None
        self.connected = False
        """True while the cache follows etcd; False while its watch is broken (it then serves
        the last config it saw)."""
        self.resyncs = 0
        """Full reads of the prefix: one at start, one after every broken watch."""

    @property
    def revision(self) -> int:
        """The etcd revision the cache reflects."""
        return self._revision

    async def start(self, *, connect_timeout: float = 30.0) -> None:
        """Load the prefix and start watching; raises if etcd stays unreachable that long."""
        self._changed = asyncio.Condition()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + connect_timeout
        while True:
            try:
                await self._resync()
                break
            except Exception as exc:
                if loop.time() >= give_up:
                    raise
                log.warning("etcd not reachable yet (%r); retrying", exc)
                await asyncio.sleep(0.5)
        self._task = asyncio.create_task(self._watch_forever(), name="etcd-config-watch")

    async def aclose(self) -> None:
        """Stop watching. Bounded: a watch whose cancel etcd never answers must not hang a
        service's shutdown (or a test) forever."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=_CANCEL_TIMEOUT * 2)
            self._task = None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until `predicate()` holds after some change; TimeoutError otherwise."""
        assert self._changed is not None, "start() the cache first"
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def _resync(self) -> None:
        self.resyncs += 1
        result = await self._client.get_prefix(self._prefix)
        fresh: dict[str, Any] = {}
        for kv in result:
            decoded = self._decode(kv.key, kv.value)
            if decoded is not None:
                fresh[decoded[0]] = decoded[1]
        self._values = fresh
        self._applied = {self._key(kv.key): kv.mod_revision for kv in result}
        self._deleted = {}
        self._revision = result.header.revision
        self.connected = True
        await self._notify()

    async def _watch_forever(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd gone, compaction, stream reset: resync below
                self.connected = False
                log.warning("etcd watch on %s broke (%r); serving cached config", self._prefix, exc)
                if isinstance(exc, (_WatchStalled, exceptions.WatchTimeoutError)):
                    await reopen_watch_stream(self._client)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            with contextlib.suppress(Exception):
                await self._resync()
                backoff = 0.05

    async def _follow(self) -> None:
        """Apply the watch's events until it breaks or a freshness check finds it stalled."""
        watching = asyncio.create_task(self._watch_once(), name="etcd-config-watch-stream")
        checking = asyncio.create_task(self._until_stalled(), name="etcd-config-freshness")
        try:
            await asyncio.wait({watching, checking}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watching, checking):
                task.cancel()
            await asyncio.wait({watching, checking}, timeout=_CANCEL_TIMEOUT * 2)
        for task in (watching, checking):
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                raise error

    async def _watch_once(self) -> None:
        try:
            watch = await asyncio.wait_for(
                self._client.watch_prefix(self._prefix, start_revision=self._revision + 1),
                _CREATE_TIMEOUT)
        except TimeoutError as exc:
            raise _WatchStalled(f"etcd created no watch in {_CREATE_TIMEOUT:g}s") from exc
        try:
            async for event in watch:
                self._apply(event)
                await self._notify()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), _CANCEL_TIMEOUT)

    def _apply(self, event: Any) -> None:
        key, revision = self._key(event.kv.key), event.kv.mod_revision
        if event.kind == "DELETE":
            self._values.pop(key, None)
            self._applied.pop(key, None)
            self._deleted[key] = revision
        else:
            decoded = self._decode(event.kv.key, event.kv.value)
            if decoded is not None:
                self._values[decoded[0]] = decoded[1]
            self._applied[key] = revision
        self._revision = max(self._revision, revision)

    async def _until_stalled(self) -> None:
        """Return when a read of the prefix shows a change the watch never delivered."""
        while True:
            await asyncio.sleep(self._freshness_interval)
            try:
                result = await self._client.get_prefix(self._prefix, keys_only=True)
            except Exception as exc:  # etcd away: the watch breaks too, or not; check later
                log.debug("freshness read of %s failed (%r)", self._prefix, exc)
                continue
            read = {self._key(kv.key): kv.mod_revision for kv in result}
            revision = result.header.revision
            await asyncio.sleep(IN_FLIGHT_GRACE)
            missed = unseen_changes(read, read_revision=revision, cached=self._applied,
                                    deleted=self._deleted)
            if missed:
                raise _WatchStalled(f"the watch missed changes to {', '.join(missed[:5])}"
                                    f"{' ...' if len(missed) > 5 else ''} by revision {revision}")
            self._deleted = deletes_to_keep(self._deleted, read_revision=revision)

    def _key(self, raw_key: bytes) -> str:
        return raw_key.decode()[len(self._prefix) :]

    def _decode(self, raw_key: bytes, raw_value: bytes) -> tuple[str, Any] | None:
        key = self._key(raw_key)
        try:
            return key, orjson.loads(raw_value)
        except orjson.JSONDecodeError:
            log.error("ignoring etcd key %s: value is not JSON", raw_key.decode())
            return None

    async def _notify(self) -> None:
        self._call_listeners()
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()


class Registration:
    """One leased key (`endpoints/{service}/{instance}`) kept alive while this instance runs.

    The lease is refreshed every third of its TTL. It can lapse while the instance lives: etcd
    paused or unreachable for longer than the TTL expires it when it answers again and deletes
    the key. The registration then puts the record back at once: it watches its own key and
    re-publishes on a delete it did not cause, retries a failed refresh within a second
    (`_RETRY_FIRST` doubling to `_RETRY_MAX`) instead of a third of the TTL later, and grants
    a new lease as soon as etcd says the old one is gone. One warning per lapse.
    """

    def __init__(self, client: aetcd.Client, key: str, record: dict[str, Any], *, ttl: int = 10):
        self._client = client
        self._key = key.encode()
        self.record = dict(record)
        self._ttl = ttl
        self._lease: Any = None
        self._put_revision = 0
        self._lapsed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty: asyncio.Event | None = None

    async def start(self) -> None:
        """Grant the lease and publish the record."""
        self._dirty = asyncio.Event()
        await self._publish()
        self._tasks = [
            asyncio.create_task(self._keep_alive(), name="etcd-registration"),
            asyncio.create_task(self._watch_key(), name="etcd-registration-watch"),
        ]

    def update(self, **changes: Any) -> None:
        """Change fields of the record; published within a moment."""
        self.record.update(changes)
        if self._dirty is not None:
            self._dirty.set()

    async def aclose(self) -> None:
        """Deregister: stop refreshing and revoke the lease (which deletes the key)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Bounded, like ConfigCache.aclose: a watch cancel etcd never answers must not hang.
        if tasks:
            await asyncio.wait(tasks, timeout=_CANCEL_TIMEOUT * 2)
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.revoke_lease(self._lease.id), 2)
            self._lease = None

    async def _publish(self) -> None:
        if self._lease is None:
            self._lease = await self._client.lease(self._ttl)
        put = await self._client.put(self._key, orjson.dumps(self.record), lease=self._lease)
        self._put_revision = max(self._put_revision, put.header.revision)

    async def _keep_alive(self) -> None:
        assert self._dirty is not None
        retry: float | None = None  # after a failure: seconds until the next try
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), retry or self._ttl / 3)
            republish = self._dirty.is_set() or retry is not None
            self._dirty.clear()
            try:
                await self._refresh(republish=republish)
            except Exception as exc:
                self._lapse(f"refreshing it failed ({exc!r})")
                retry = _RETRY_FIRST if retry is None else min(retry * 2, _RETRY_MAX)
                continue
            retry = None
            if self._lapsed:
                self._lapsed = False
                log.info("endpoint %s registered again", self._key.decode())

    async def _refresh(self, *, republish: bool) -> None:
        if self._lease is not None:
            reply = await self._client.refresh_lease(self._lease.id)
            if reply is None or reply.TTL <= 0:
                self._lapse("its lease expired")
                self._lease = None
        if self._lease is None or republish:
            await self._publish()

    async def _watch_key(self) -> None:
        """Wake the keep-alive loop when the key is deleted behind this registration's back."""
        assert self._dirty is not None
        backoff = _RETRY_FIRST
        while True:
            try:
                watch = await asyncio.wait_for(
                    self._client.watch(self._key, start_revision=self._put_revision + 1),
                    _CREATE_TIMEOUT)
                try:
                    async for event in watch:
                        backoff = _RETRY_FIRST
                        if event.kind == "DELETE" and event.kv.mod_revision > self._put_revision:
                            self._lapse("its key was deleted")
                            self._dirty.set()
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watch.cancel(), _CANCEL_TIMEOUT)
            except aetcd.exceptions.RevisionCompactedError:
                self._dirty.set()  # a delete may hide in the compacted history: put anyway
            except Exception as exc:  # etcd away: watch again from the last put
                log.debug("watch on %s broke (%r)", self._key.decode(), exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_MAX)

    def _lapse(self, why: str) -> None:
        if not self._lapsed:
            self._lapsed = True
            log.warning("endpoint %s lapsed: %s; registering again", self._key.decode(), why)
