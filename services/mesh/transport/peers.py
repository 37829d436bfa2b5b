"""Peers found through etcd: one LinkClient per live instance of a service.

Each instance publishes `endpoints/{service}/{instance}` (leased) with at least a `link` URL.
`LinkPool` keeps a link open to every listed instance, reconnecting with backoff while it stays
listed and closing it when its key disappears (the lease expired or it deregistered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp

from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import LinkClosed, Unavailable
from services.mesh.transport.links import LinkClient

log = logging.getLogger(__name__)


class LinkPool:
    """Open links to every live instance of `service`."""

    def __init__(self, session: aiohttp.ClientSession, config: ConfigView, service: str) -> None:
        self._session = session
        self._config = config
        self._prefix = f"endpoints/{service}/"
        self.service = service
        self._links: dict[str, LinkClient] = {}
        self._records: dict[str, dict[str, Any]] = {}
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

    def links(self) -> list[tuple[LinkClient, dict[str, Any]]]:
        """Open links with the endpoint record each peer published."""
        return [
            (link, self._records[key])
            for key, link in self._links.items()
            if not link.closed and key in self._records
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
        for instance in set(self._tasks) - set(current):
            self._tasks.pop(instance).cancel()
        for instance, record in current.items():
            task = self._tasks.get(instance)
            if task is None or self._records.get(instance, {}).get("link") != record["link"]:
                if task is not None:
                    task.cancel()
                self._tasks[instance] = asyncio.create_task(
                    self._maintain(instance, record["link"])
                )
        self._records = current
        self._notify()

    async def _maintain(self, instance: str, url: str) -> None:
        backoff = 0.05
        link: LinkClient | None = None
        try:
            while True:
                link = LinkClient(self._session, url, peer=f"{self.service} {instance}")
                try:
                    await link.connect()
                except LinkClosed as exc:
                    log.info("%s; retrying in %.2fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                self._links[instance] = link
                self._notify()
                await link.wait_closed()
                self.drops += 1
                self._links.pop(instance, None)
                self._notify()
                await asyncio.sleep(0.05)
        finally:
            self._links.pop(instance, None)
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
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def rendezvous_score(key: str, instance: str) -> int:
    """Highest-random-weight hash: stable choice of an instance for a key."""
    return zlib.crc32(f"{key}\0{instance}".encode())
