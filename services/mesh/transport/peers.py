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


MAX_RANKED_KEYS = 4096
"""Keys whose ranking a pool caches at most (model names: far fewer in practice)."""

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
        self._rankings: dict[str, list[LinkClient]] = {}
        """Open links best first per key (`pick_by_key`), forgotten on any change."""
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

    def pick_by_key(self, key: str, *, k: int = 1) -> LinkClient:
        """Of the `k` open links that rank highest for `key` by rendezvous hashing (stable
        while peers live), the one with the fewest calls in flight; `k=1`: the top one.

        The ranking is cached per key until a link or record changes: this is the router's
        per-request path, so a pick walks a ready list and allocates nothing."""
        ranking = self._rankings.get(key)
        best = None if ranking is None else _least_busy(ranking, k)
        if best is None:  # not ranked yet, or every ranked link closed before the pool saw it
            ranking = self._rank(key)
            best = _least_busy(ranking, k)
        if best is None:
            raise Unavailable(f"no live {self.service} instance is reachable")
        return best

    def _rank(self, key: str) -> list[LinkClient]:
        if len(self._rankings) >= MAX_RANKED_KEYS:
            self._rankings.clear()
        ranking = [link for _, link in sorted(
            ((rendezvous_score(key, _instance(link, record)), link)
             for link, record in self.links()),
            key=_score, reverse=True,  # stable: equal scores keep the pool's order
        )]
        self._rankings[key] = ranking
        return ranking

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
        self._rankings.clear()
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


def _instance(link: LinkClient, record: dict[str, Any]) -> str:
    return str(record.get("instance", link.url))


def _score(scored: tuple[int, LinkClient]) -> int:
    return scored[0]


def _least_busy(ranking: list[LinkClient], k: int) -> LinkClient | None:
    """The link with the fewest calls in flight among the first `k` open ones of `ranking`
    (the better ranked on a tie)."""
    best: LinkClient | None = None
    for link in ranking:
        if link.closed:
            continue
        if best is None or link.inflight < best.inflight:
            best = link
        k -= 1
        if k <= 0:
            break
    return best
