"""Health of a service's dependencies as Prometheus metrics, read when `/metrics` is scraped.

    infermesh_etcd_up                      1 while the config cache follows etcd, else 0
    infermesh_etcd_resyncs_total           full reads of the config prefix (1 + broken watches)
    infermesh_link_up{service}             open links to instances of a peer service
    infermesh_link_peers{service}          instances of that service listed in etcd
    infermesh_link_drops_total{service}    links to that service that closed
    infermesh_postgres_up                  1 when the last probe (SELECT 1) answered in time

Nothing here runs on the request path: the collector reads counters the cache and the link
pools keep anyway, and the Postgres probe is one query every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.mesh.infra.etcd import ConfigCache
from services.mesh.transport.peers import LinkPool

log = logging.getLogger(__name__)


class PostgresProbe:
    """`SELECT 1` every `interval` seconds; `up` says whether the last one answered."""

    def __init__(self, pool: asyncpg.Pool, *, interval: float = 5.0, timeout: float = 2.0):
        self._pool = pool
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self.up = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._probe_forever(), name="postgres-probe")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def probe(self) -> bool:
        try:
            await asyncio.wait_for(self._pool.fetchval("SELECT 1"), self._timeout)
        except Exception as exc:  # down, timed out, pool closed: all "not up"
            if self.up:
                log.warning("Postgres probe failed (%r)", exc)
            self.up = False
        else:
            self.up = True
        return self.up

    async def _probe_forever(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._interval)


class HealthCollector(Collector):
    """The metrics above for one service instance."""

    def __init__(self, config: ConfigCache, pools: list[LinkPool],
                 postgres: list[PostgresProbe]) -> None:
        self._config = config
        self._pools = pools
        self._postgres = postgres

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("infermesh_etcd_up", "1 while the config cache follows etcd",
                                value=float(self._config.connected))
        yield CounterMetricFamily("infermesh_etcd_resyncs", "Full reads of the config prefix",
                                  value=self._config.resyncs)
        up = GaugeMetricFamily("infermesh_link_up", "Open links to a peer service",
                               labels=["service"])
        peers = GaugeMetricFamily("infermesh_link_peers", "Instances of a peer service in etcd",
                                  labels=["service"])
        drops = CounterMetricFamily("infermesh_link_drops", "Links to a peer service that closed",
                                    labels=["service"])
        for pool in self._pools:
            up.add_metric([pool.service], len(pool.links()))
            peers.add_metric([pool.service], pool.peers)
            drops.add_metric([pool.service], pool.drops)
        yield from (up, peers, drops)
        if self._postgres:
            yield GaugeMetricFamily("infermesh_postgres_up", "1 when Postgres answered the probe",
                                    value=float(all(p.up for p in self._postgres)))
