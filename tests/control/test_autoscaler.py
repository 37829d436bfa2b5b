"""The autoscaler runner over real etcd and Postgres, with a fake batcher serving the batcher's
real metrics families (services/batcher/metrics.py) as Prometheus text."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aetcd
import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from control.autoscaler.actuators import ActuationFailed, EtcdActuator
from control.autoscaler.metrics import AutoscalerMetrics
from control.autoscaler.runner import Autoscaler, TickReport
from services.batcher.metrics import BatcherMetrics
from services.mesh.infra.db import create_pool, migrate
from services.mesh.infra.etcd import ConfigCache, connect_client

IRIS = ("iris", "v1")


class FakeBatcher:
    """A batcher's `/metrics` for iris v1, overloaded: rows arrive four times as fast as its
    one worker serves them (full batches of 8), and they wait a second in the queue."""

    def __init__(self) -> None:
        self.metrics = BatcherMetrics()
        self.queued = 0
        self.metrics.watch_queues(lambda: [(*IRIS, "realtime", self.queued)])
        self.metrics.watch_pending(lambda: [(*IRIS, self.queued + 8)])
        self._version = self.metrics.version(*IRIS)

    def overloaded_for(self, seconds: float) -> None:
        for _ in range(int(seconds * 100 / 8)):  # 100 rows/s served
            self._version.executed(8)
            for _ in range(8):
                self._version.queue_duration.observe(1.0)
        self.queued += int(seconds * 300)  # 400 rows/s arrive

    async def handle(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            content_type="text/plain")


@dataclass
class Fleet:
    batcher: FakeBatcher
    config: ConfigCache
    etcd: aetcd.Client
    prefix: str
    pool: asyncpg.Pool
    session: aiohttp.ClientSession
    database_url: str

    def autoscaler(self, *, pool: asyncpg.Pool | None = None, **kwargs: object) -> Autoscaler:
        board = EtcdActuator(self.etcd, etcd_prefix=self.prefix)
        return Autoscaler(self.config, self.session, pool or self.pool, board, **kwargs)  # type: ignore[arg-type]

    async def scale_record(self) -> object:
        found = await self.etcd.get(f"{self.prefix}scale/iris/v1".encode())
        return None if found is None else orjson.loads(found.value)

    async def decisions(self) -> list[asyncpg.Record]:
        return list(await self.pool.fetch("SELECT * FROM scale_decisions ORDER BY id"))


@contextlib.asynccontextmanager
async def serving(batcher: FakeBatcher) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/metrics", batcher.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fleet(etcd_url: str, etcd_prefix: str, database_url: str) -> AsyncIterator[Fleet]:
    """iris v1 opted in (1 to 4 replicas), one ready worker, one batcher, a migrated database."""
    batcher = FakeBatcher()
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(serving(batcher))
        etcd = connect_client(etcd_url)
        stack.push_async_callback(etcd.close)
        records = {
            "models/iris/v1": {"model": "iris", "version": "v1", "batching": {"max_batch_size": 8},
                               "autoscaling": {"min_replicas": 1, "max_replicas": 4}},
            "endpoints/worker/w1": {"instance": "w1", "models": ["iris/v1"]},
            "endpoints/worker/w2": {"instance": "w2", "models": ["iris/v1"], "draining": True},
            "endpoints/batcher/b1": {"instance": "b1", "http": url},
        }
        for key, record in records.items():
            await etcd.put(f"{etcd_prefix}{key}".encode(), orjson.dumps(record))
        config = ConfigCache(etcd, etcd_prefix)
        await config.start()
        stack.push_async_callback(config.aclose)
        pool = await create_pool(database_url)
        stack.push_async_callback(pool.close)
        await migrate(pool)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Fleet(batcher, config, etcd, etcd_prefix, pool, session, database_url)


async def overload_until_a_change(fleet: Fleet, autoscaler: Autoscaler) -> TickReport:
    """Tick every 2 s of the injected clock under overload until a change is recorded."""
    now = 0.0
    report = await autoscaler.tick(now)  # the first scrape: gauges, no rates yet
    assert report.leader and not report.changed
    while not report.changed and now < 60:
        fleet.batcher.overloaded_for(2)
        now += 2
        report = await autoscaler.tick(now)
    return report


async def test_an_overload_is_published_recorded_and_counted(fleet: Fleet) -> None:
    metrics = AutoscalerMetrics()
    autoscaler = fleet.autoscaler(metrics=metrics)
    try:
        report = await overload_until_a_change(fleet, autoscaler)
    finally:
        await autoscaler.aclose()

    desired = report.changed[IRIS]
    assert 1 < desired <= 3  # one ready worker (the draining one does not count), step <= 2
    record = await fleet.scale_record()
    assert isinstance(record, dict) and record["replicas"] == desired
    assert record["reason"] == report.decisions[IRIS].reason and record["at"]
    [row] = await fleet.decisions()
    assert (row["model"], row["version"], row["previous"], row["desired"]) == (
        "iris", "v1", 1, desired)
    assert row["reason"] == record["reason"]
    observation = row["inputs"]["observation"]
    assert observation["ready"] == 1 and observation["queue_rows"] == fleet.batcher.queued
    assert observation["served_rate"] == pytest.approx(100, rel=0.1)
    assert observation["occupancy"] == 1.0 and observation["wait_p95"] > 0.5
    assert row["inputs"]["policy"] == dict(report.decisions[IRIS].inputs)
    labels = {"model": "iris", "version": "v1"}
    assert metrics.registry.get_sample_value(
        "infermesh_autoscaler_decisions_total", {**labels, "direction": "up"}) == 1
    assert metrics.registry.get_sample_value(
        "infermesh_autoscaler_desired_replicas", labels) == desired


async def test_only_the_leader_scales(fleet: Fleet) -> None:
    leader = fleet.autoscaler()
    other_pool = await create_pool(fleet.database_url)  # another control API replica
    follower = fleet.autoscaler(pool=other_pool)
    try:
        await overload_until_a_change(fleet, leader)
        rows = len(await fleet.decisions())
        fleet.batcher.overloaded_for(2)
        follows = await follower.tick(100.0)
        assert not follows.leader and follows.decisions == {} and follows.changed == {}
        assert len(await fleet.decisions()) == rows == 1

        await leader.aclose()
        assert (await follower.tick(102.0)).leader  # the lock is free: it takes over
    finally:
        await follower.aclose()
        await leader.aclose()
        await other_pool.close()


class RefusingEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    async def apply(self, model: str, version: str, replicas: int) -> None:
        self.calls.append((model, version, replicas))
        raise ActuationFailed("kubernetes: scaling deployment x/y to 2 failed: HTTP 403")


async def test_a_refused_actuation_is_logged_and_retried_not_recorded_twice(
    fleet: Fleet, caplog: pytest.LogCaptureFixture,
) -> None:
    engine = RefusingEngine()
    autoscaler = fleet.autoscaler(engine=engine)
    try:
        with caplog.at_level(logging.ERROR, logger="control.autoscaler.runner"):
            report = await overload_until_a_change(fleet, autoscaler)
            await autoscaler.tick(100.0)  # the next tick tries again
    finally:
        await autoscaler.aclose()

    desired = report.changed[IRIS]
    assert engine.calls[:2] == [(*IRIS, desired), (*IRIS, desired)]
    assert "autoscaler: iris/v1: kubernetes: scaling deployment x/y to 2 failed: HTTP 403; " \
           "trying again next tick" in caplog.text
    assert "Traceback" not in caplog.text
    assert len(await fleet.decisions()) == 1
