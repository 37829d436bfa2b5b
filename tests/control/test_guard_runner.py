from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from control.guard.runner import Guard, run_guard
from deploy.localdeps import free_port
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import PreconditionFailed
from services.mesh.domain.types import Rollout, Route, ShadowRoute
from services.mesh.infra.db import create_pool
from tests.control.test_guard_metrics import RouterMetrics


@dataclass
class Write:
    rollout: Rollout
    author: str
    reason: str


class FakeStore:
    """Rollouts in memory with the control API's epoch check."""

    def __init__(self, *rollouts: Rollout) -> None:
        self.rollouts = {r.model: r for r in rollouts}
        self.writes: list[Write] = []
        self.reads = 0
        self.operator_races = False
        """When set, an operator's write lands just before each of the guard's."""

    async def guarded(self) -> list[Rollout]:
        self.reads += 1
        return [r for r in self.rollouts.values() if r.guard]

    async def set_rollout(self, rollout: Rollout, *, author: str, reason: str,
                          if_match: int | None) -> Rollout:
        current = self.rollouts[rollout.model]
        if self.operator_races:
            current = self.rollouts[rollout.model] = replace(current, epoch=current.epoch + 1)
        if if_match is not None and if_match != current.epoch:
            raise PreconditionFailed(f"epoch is {current.epoch}, not {if_match}")
        written = replace(rollout, epoch=current.epoch + 1)
        self.rollouts[rollout.model] = written
        self.writes.append(Write(written, author, reason))
        return written


@contextlib.asynccontextmanager
async def metrics_server(router: RouterMetrics) -> AsyncIterator[str]:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=router.text())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@dataclass
class Mesh:
    routers: list[RouterMetrics]
    config: StaticConfig
    session: aiohttp.ClientSession
    pool: asyncpg.Pool
    database_url: str

    def serve(self, version: str, count: int, *, outcome: str = "success",
              seconds: float = 0.002) -> None:
        """`count` requests of iris `version` on each router."""
        for router in self.routers:
            router.serve("iris", version, count, outcome=outcome, seconds=seconds)


@pytest.fixture
async def mesh(database_url: str) -> AsyncIterator[Mesh]:
    """Two routers serving metrics, one registered router that is down, a pool, a session."""
    routers = [RouterMetrics(), RouterMetrics()]
    config = StaticConfig()
    async with contextlib.AsyncExitStack() as stack:
        for i, router in enumerate(routers):
            url = await stack.enter_async_context(metrics_server(router))
            config.put(f"endpoints/router/r{i}", {"instance": f"r{i}", "http": url})
        config.put("endpoints/router/dead", {"instance": "dead",
                                             "http": f"http://127.0.0.1:{free_port()}"})
        pool = await create_pool(database_url)
        stack.push_async_callback(pool.close)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Mesh(routers, config, session, pool, database_url)


def canary(guard: dict[str, object], *, epoch: int = 4) -> Rollout:
    return Rollout(
        "iris", (Route("v1", 90), Route("v2", 10)), sticky_key="user", salt="s",
        shadow=(ShadowRoute("v3", 0.5),), fallback="v1", epoch=epoch, guard=guard,
    )


async def test_failing_canary_is_rolled_back_by_the_guard(mesh: Mesh) -> None:
    store = FakeStore(canary({"min_samples": 20}))
    guard = Guard(store, mesh.config, mesh.session, mesh.pool)
    try:
        first = await guard.tick(0.0)
        assert first.leader and first.routers == 2  # the dead router is skipped
        assert first.verdicts["iris"].action == "hold" and not store.writes

        mesh.serve("v1", 100)
        mesh.serve("v2", 10, outcome="failure", seconds=0.004)
        second = await guard.tick(1.0)
    finally:
        await guard.aclose()

    assert second.verdicts["iris"].action == "rollback"
    [write] = store.writes
    assert write.author == "guard"
    assert write.rollout.routes == (Route("v1", 100),) and write.rollout.fallback == "v1"
    assert write.rollout.guard is None and write.rollout.epoch == 5
    assert (write.rollout.sticky_key, write.rollout.salt) == ("user", "s")
    assert write.rollout.shadow == (ShadowRoute("v3", 0.5),)
    assert write.reason.startswith(
        "canary v2 error rate 100.0% vs baseline v1 0.0% (allowed +5.0%) over 1 s, "
        "20 vs 200 requests; p99 5.0 ms vs 2.0 ms"
    )


async def test_healthy_canary_advances_through_the_steps(mesh: Mesh) -> None:
    guard_block = {"min_samples": 10, "steps": [25, 50, 100], "step_interval_s": 10}
    store = FakeStore(canary(guard_block))
    guard = Guard(store, mesh.config, mesh.session, mesh.pool)
    now = 0.0
    try:
        while store.rollouts["iris"].guard is not None and now < 100:
            await guard.tick(now)  # sees the epoch: the step's clock starts
            mesh.serve("v1", 20)
            mesh.serve("v2", 20)
            now += 10
            await guard.tick(now)  # held 10 s, healthy: next step
            now += 1
    finally:
        await guard.aclose()

    steps = [(w.rollout.routes, w.rollout.fallback, w.author) for w in store.writes]
    assert steps == [
        ((Route("v1", 75), Route("v2", 25)), "v1", "guard"),
        ((Route("v1", 50), Route("v2", 50)), "v1", "guard"),
        ((Route("v2", 100),), "v2", "guard"),
    ]
    assert store.writes[1].rollout.guard == {**guard_block, "canary": "v2", "baseline": "v1"}
    assert store.writes[-1].reason.startswith("promoted v2 to 100%: canary v2 error rate 0.0%")


async def test_a_guard_write_that_lost_a_race_is_dropped_and_judged_afresh(mesh: Mesh) -> None:
    store = FakeStore(canary({"min_samples": 5}))
    store.operator_races = True
    guard = Guard(store, mesh.config, mesh.session, mesh.pool)
    try:
        await guard.tick(0.0)
        mesh.serve("v2", 10, outcome="failure")
        mesh.serve("v1", 10)
        raced = await guard.tick(1.0)
        store.operator_races = False
        after = await guard.tick(2.0)  # a new epoch: the comparison restarts
    finally:
        await guard.aclose()

    assert raced.verdicts["iris"].action == "rollback" and not store.writes
    assert after.verdicts["iris"].action == "hold" and not store.writes


async def test_a_guard_that_no_longer_parses_is_skipped_with_a_warning(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    broken = replace(canary({"canary": "v9"}), model="wine")
    store = FakeStore(broken, canary({"min_samples": 5}))
    guard = Guard(store, mesh.config, mesh.session, mesh.pool)
    try:
        with caplog.at_level(logging.WARNING, logger="control.guard.runner"):
            report = await guard.tick(0.0)
    finally:
        await guard.aclose()

    assert set(report.verdicts) == {"iris"}
    assert "skipping wine (epoch 4): guard.canary: version 'v9' is not one of the routes" in (
        caplog.text)


async def test_only_one_guard_leads_per_database(mesh: Mesh) -> None:
    store = FakeStore(canary({}))
    leader = Guard(store, mesh.config, mesh.session, mesh.pool)
    other_pool = await create_pool(mesh.database_url)  # another replica
    other = Guard(store, mesh.config, mesh.session, other_pool)
    try:
        assert (await leader.tick(0.0)).leader
        assert (await leader.tick(1.0)).leader  # keeps the lead
        follower = await other.tick(1.0)
        assert not follower.leader and follower.verdicts == {} and store.reads == 2

        await leader.aclose()
        assert (await other.tick(2.0)).leader
    finally:
        await other.aclose()
        await leader.aclose()
        await other_pool.close()


async def test_run_guard_survives_a_failing_tick_and_gives_up_the_lead_when_cancelled(
    mesh: Mesh
) -> None:
    calls = 0
    second_tick = asyncio.Event()

    class FlakyStore(FakeStore):
        async def guarded(self) -> list[Rollout]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("store down")
            second_tick.set()
            return []

    task = asyncio.create_task(run_guard(FlakyStore(), mesh.config, mesh.session, mesh.pool,
                                         interval=0.001))
    await asyncio.wait_for(second_tick.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    next_replica = Guard(FakeStore(), mesh.config, mesh.session, mesh.pool)
    try:
        assert (await next_replica.tick(0.0)).leader
    finally:
        await next_replica.aclose()
