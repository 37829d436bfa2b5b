"""Peers found through etcd: one LinkClient per live instance of a service.

Each instance publishes `endpoints/{service}/{instance}` (leased) with at least a `link` URL.
`LinkPool` keeps a link open to every listed instance, reconnecting with backoff while it stays
listed and closing it when its key disappears (the lease expired or it deregistered).

One exception: the last known peers. When etcd pauses for longer than a lease's TTL, it expires
the lease at resume and deletes the key of an instance that was alive all along, until that
instance re-registers. So a peer whose key disappears while its link is open and healthy stays
on as an *orphan* when no listed peer is live: it is the best knowledge the pool has, better than
answering 503. See `LinkPool` for when an orphan goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp

from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import LinkClosed, Unavailable
from services.mesh.transport.auth import Credential
from services.mesh.transport.links import DEFAULT_MAX_FRAME_BYTES, LinkClient

log = logging.getLogger(__name__)


DEFAULT_ORPHAN_GRACE = 20.0
"""Seconds an orphan may serve: twice the endpoint lease's TTL (10 s), time enough for its
instance to notice the lapse and re-register once etcd answers again."""


class LinkPool:
    """Open links to every live instance of `service`.

    An orphan (a peer whose key disappeared while its link was open) is used only while no
    listed peer has an open link, and goes when its link closes, when `orphan_grace` seconds
    pass without its key coming back, or as soon as a listed peer is live again. If its key comes
    back first, it is an ordinary peer again on the same link. Orphans never compete with
    listed peers: `pick_by_key` hashes over the listed live peers alone, so a model keeps its
    batcher while any listed batcher lives, and a peer that deregistered to drain gets no new
    calls while another can take them. When every key lapses at once (the etcd pause), the
    orphans carry the traffic until the first instance is back.
    """

    def __init__(
        self, session: aiohttp.ClientSession, config: ConfigView, service: str, *,
        credential: Credential, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        orphan_grace: float = DEFAULT_ORPHAN_GRACE,
    ) -> None:
        self._session = session
        self._credential = credential
        self._max_frame_bytes = max_frame_bytes
        self._config = config
        self._prefix = f"endpoints/{service}/"
        self.service = service
        self._orphan_grace = orphan_grace
        self._links: dict[str, LinkClient] = {}
        self._records: dict[str, dict[str, Any]] = {}
        self._orphans: dict[str, _Orphan] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self.drops = 0
        """Links that closed under this pool (each is then reconnected while its peer is listed)."""

    @property
    def peers(self) -> int:
        """Instances of the service listed in etcd."""
        return len(self._records)

    def start(self) -> None:
        """Follow the endpoint keys in the config cache."""
        self._config.subscribe(self._sync)
        self._sync()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever a link opens or closes or a record changes."""
        self._listeners.append(listener)

    @property
    def orphans(self) -> int:
        """Peers kept on their open links after their keys disappeared."""
        return len(self._orphans)

    def links(self) -> list[tuple[LinkClient, dict[str, Any]]]:
        """Open links with the endpoint record each peer published: the listed peers', or
        the orphans' while no listed peer is live."""
        listed = self._open(self._records)
        return listed or self._open({k: o.record for k, o in self._orphans.items()})

    def _open(self, records: dict[str, dict[str, Any]]) -> list[tuple[LinkClient, dict[str, Any]]]:
        return [
            (link, records[key])
            for key, link in self._links.items()
            if not link.closed and key in records
        ]

    def pick(self, accepts: Callable[[dict[str, Any]], bool] | None = None) -> LinkClient:
        """The open link with the fewest calls in flight whose record `accepts`."""
        best: LinkClient | None = None
        for link, record in self.links():
            if accepts is not None and not accepts(record):
                continue
            if best is None or link.inflight < best.inflight:
                best = link
        if best is None:
            raise Unavailable(f"no live {self.service} instance is reachable")
        return best

    def pick_by_key(self, key: str) -> LinkClient:
        """The open link chosen for `key` by rendezvous hashing (stable while peers live)."""
        best: tuple[int, LinkClient] | None = None
        for link, record in self.links():
            score = rendezvous_score(key, str(record.get("instance", link.url)))
            if best is None or score > best[0]:
                best = (score, link)
        if best is None:
            raise Unavailable(f"no live {self.service} instance is reachable")
        return best[1]

    def _sync(self) -> None:
        if self._closed:
            return
        current = {
            key[len(self._prefix) :]: value
            for key, value in self._config.items(self._prefix).items()
            if isinstance(value, dict) and value.get("link")
        }
        others_live = bool(self._open(current))
        for instance in set(self._tasks) - set(current) - set(self._orphans):
            self._unlisted(instance, keep=not others_live)
        for instance, record in current.items():
            known = self._records.get(instance) or self._adopt(instance) or {}
            task = self._tasks.get(instance)
            if task is None or known.get("link") != record["link"]:
                if task is not None:
                    task.cancel()
                self._tasks[instance] = asyncio.create_task(
                    self._maintain(instance, record["link"])
                )
        self._records = current
        self._prune_orphans()
        self._notify()

    def _unlisted(self, instance: str, *, keep: bool) -> None:
        """The key of `instance` disappeared: keep its open link as an orphan, or close it."""
        link = self._links.get(instance)
        if not keep or link is None or link.closed or self._orphan_grace <= 0:
            self._tasks.pop(instance).cancel()
            return
        timer = asyncio.get_running_loop().call_later(
            self._orphan_grace, self._drop_orphan, instance
        )
        self._orphans[instance] = _Orphan(self._records[instance], timer)
        log.info("%s %s left etcd with its link open: kept for up to %.0fs while no listed "
                 "peer is live", self.service, instance, self._orphan_grace)

    def _adopt(self, instance: str) -> dict[str, Any] | None:
        """An orphan's key is back: it is an ordinary peer again; its last record or None."""
        orphan = self._orphans.pop(instance, None)
        if orphan is None:
            return None
        orphan.timer.cancel()
        return orphan.record

    def _drop_orphan(self, instance: str) -> None:
        if self._adopt(instance) is not None:
            task = self._tasks.pop(instance, None)
            if task is not None:
                task.cancel()
            self._notify()

    def _prune_orphans(self) -> None:
        """Orphans go as soon as a listed peer is live."""
        if self._orphans and self._open(self._records):
            for instance in list(self._orphans):
                self._drop_orphan(instance)

    async def _maintain(self, instance: str, url: str) -> None:
        backoff = 0.05
        link: LinkClient | None = None
        try:
            while True:
                link = LinkClient(self._session, url, peer=f"{self.service} {instance}",
                                  credential=self._credential,
                                  max_frame_bytes=self._max_frame_bytes)
                try:
                    await link.connect()
                except LinkClosed as exc:
                    log.info("%s; retrying in %.2fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                self._links[instance] = link
                self._prune_orphans()
                self._notify()
                await link.wait_closed()
                self.drops += 1
                self._links.pop(instance, None)
                if self._adopt(instance) is not None:  # an orphan: nothing to reconnect to
                    self._tasks.pop(instance, None)
                    return
                self._notify()
                await asyncio.sleep(0.05)
        finally:
            if self._links.get(instance) is link:  # not a successor's link (a new URL)
                del self._links[instance]
            if link is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(link.aclose())
            self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("link pool listener failed")

    async def aclose(self) -> None:
        self._closed = True
        for orphan in self._orphans.values():
            orphan.timer.cancel()
        self._orphans.clear()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Orphan(NamedTuple):
    record: dict[str, Any]
    """The endpoint record the peer last published."""
    timer: asyncio.TimerHandle
    """Drops the orphan when its grace ends."""


def rendezvous_score(key: str, instance: str) -> int:
    """Highest-random-weight hash: stable choice of an instance for a key."""
    return zlib.crc32(f"{key}\0{instance}".encode())
