"""The guard loop: scrape the routers, judge every guarded rollout, roll back or advance.

One control API replica guards at a time: the one holding a Postgres session advisory lock
on a dedicated pooled connection (when that connection dies the server frees the lock and
another replica takes over on its next tick). A tick never raises for one bad router or
rollout: a failed scrape skips that router, a guard that no longer parses skips that
rollout, a write that lost a race (a stale epoch) waits for the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import asyncpg

from control.guard.metrics import VersionFigures, VersionKey, parse_figures
from control.guard.policy import Verdict, canary_weight, evaluate, next_rollout
from control.guard.spec import GuardSpec, parse_guard
from control.guard.window import EpochClock, RouterWindows
from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import InvalidInput, PreconditionFailed
from services.mesh.domain.types import Rollout

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every control API replica.
GUARD_LOCK = 0x1F_E5_6A_4D
ROUTERS = "endpoints/router/"


class RolloutStore(Protocol):
    """Where rollouts live (the control API's store)."""

    async def guarded(self) -> list[Rollout]: ...

    async def set_rollout(self, rollout: Rollout, *, author: str, reason: str,
                          if_match: int | None) -> Rollout: ...


class Leadership:
    """Which replica leads: a session advisory lock held on one connection from `pool`.

    `name` and `duty` only word the log lines (the autoscaler leads on a lock of its own)."""

    def __init__(self, pool: asyncpg.Pool, *, key: int = GUARD_LOCK, name: str = "guard",
                 duty: str = "guards rollouts") -> None:
        self._pool = pool
        self._key = key
        self._name = name
        self._duty = duty
        self._conn: asyncpg.Connection | None = None

    async def hold(self) -> bool:
        """True while this replica leads: check the held connection, or try to take the lock."""
        if self._conn is not None:
            try:
                await self._conn.fetchval("SELECT 1", timeout=2)
                return True
            except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
                log.warning("%s: lost the leader connection (%r)", self._name, exc)
                await self._release()
        conn = await self._pool.acquire(timeout=5)
        try:
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key, timeout=2):
                self._conn = conn
                log.info("%s: this replica now %s", self._name, self._duty)
                return True
        except BaseException:
            await self._pool.release(conn)
            raise
        await self._pool.release(conn)
        return False

    async def aclose(self) -> None:
        """Give up the lead (another replica takes it on its next tick)."""
        if self._conn is not None:
            with contextlib.suppress(asyncpg.PostgresError, OSError, TimeoutError):
                await self._conn.execute("SELECT pg_advisory_unlock($1)", self._key, timeout=2)
            await self._release()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(asyncpg.PostgresError, OSError, TimeoutError):
                await self._pool.release(conn, timeout=2)


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one tick saw and decided."""

    leader: bool
    routers: int = 0
    """Routers scraped successfully."""
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    """Per guarded model (one whose guard parsed)."""


class Guard:
    """Feeds router scrapes to the windows and rollouts to `evaluate`; acts on the verdicts."""

    def __init__(self, store: RolloutStore, config: ConfigView, session: aiohttp.ClientSession,
                 pool: asyncpg.Pool, *, scrape_timeout: float = 0.5) -> None:
        self._store = store
        self._config = config
        self._session = session
        self._leadership = Leadership(pool)
        self._scrape_timeout = aiohttp.ClientTimeout(total=scrape_timeout)
        self._windows = RouterWindows()
        self._epochs = EpochClock()
        self._unparsed: set[tuple[str, int]] = set()
        self._closed = False

    async def tick(self, now: float) -> TickReport:
        """One round at time `now` (the loop's clock): lead, scrape, judge, act."""
        if self._closed:
            raise RuntimeError("the guard is closed")
        if not await self._leadership.hold():
            return TickReport(leader=False)
        guarded = self._parse(await self._store.guarded())
        self._epochs.forget_except({rollout.model for rollout, _ in guarded})
        keep_s = max((spec.window_s for _, spec in guarded), default=0.0)
        self._windows.prune(before=now - keep_s)
        routers = await self._scrape_all(now) if guarded else 0
        verdicts: dict[str, Verdict] = {}
        for rollout, spec in guarded:
            try:
                verdicts[rollout.model] = await self._judge(rollout, spec, now)
            except Exception:
                log.exception("guard: judging the rollout of %s failed", rollout.model)
        return TickReport(leader=True, routers=routers, verdicts=verdicts)

    async def aclose(self) -> None:
        """Give up the lead; the guard cannot tick again."""
        self._closed = True
        await self._leadership.aclose()

    def _parse(self, rollouts: list[Rollout]) -> list[tuple[Rollout, GuardSpec]]:
        parsed = []
        for rollout in rollouts:
            try:
                parsed.append((rollout, parse_guard(rollout.guard, rollout)))
            except InvalidInput as exc:
                if (rollout.model, rollout.epoch) not in self._unparsed:  # warn once per epoch
                    self._unparsed.add((rollout.model, rollout.epoch))
                    log.warning("guard: skipping %s (epoch %d): %s", rollout.model,
                                rollout.epoch, exc.message)
        self._unparsed &= {(rollout.model, rollout.epoch) for rollout in rollouts}
        return parsed

    async def _scrape_all(self, now: float) -> int:
        routers = {
            str(record.get("instance") or key): str(record["http"])
            for key, record in self._config.items(ROUTERS).items()
            if isinstance(record, Mapping) and record.get("http")
        }
        scrapes = await asyncio.gather(*(self._scrape(name, url) for name, url in routers.items()))
        for name, figures in zip(routers, scrapes, strict=True):
            if figures is not None:
                self._windows.record(name, figures, now=now)
        return sum(figures is not None for figures in scrapes)

    async def _scrape(self, router: str, url: str) -> dict[VersionKey, VersionFigures] | None:
        try:
            metrics_url = f"{url.rstrip('/')}/metrics"
            async with self._session.get(metrics_url, timeout=self._scrape_timeout) as response:
                response.raise_for_status()
                text = await response.text()
            return parse_figures(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("guard: scraping router %s at %s failed (%r); skipped this tick",
                        router, url, exc)
            return None

    async def _judge(self, rollout: Rollout, spec: GuardSpec, now: float) -> Verdict:
        since = self._epochs.since(rollout.model, rollout.epoch, now=now)
        start = max(since, now - spec.window_s)
        canary = self._windows.delta((rollout.model, spec.canary), start=start)
        baseline = self._windows.delta((rollout.model, spec.baseline), start=start)
        verdict = evaluate(spec, canary, baseline, held_s=now - since,
                           current_weight=canary_weight(rollout, spec.canary))
        changed = next_rollout(rollout, spec, verdict)
        if changed is None:
            log.debug("guard: %s: hold: %s", rollout.model, verdict.reason)
            return verdict
        try:
            await self._store.set_rollout(changed, author="guard", reason=verdict.reason,
                                          if_match=rollout.epoch)
        except PreconditionFailed:
            log.info("guard: %s changed under the guard; judging again next tick", rollout.model)
            return verdict
        level = logging.WARNING if verdict.action == "rollback" else logging.INFO
        log.log(level, "guard: %s: %s: %s", rollout.model, verdict.action, verdict.reason)
        return verdict


async def run_guard(store: RolloutStore, config: ConfigView, session: aiohttp.ClientSession,
                    pool: asyncpg.Pool, *, interval: float) -> None:
    """Guard rollouts every `interval` seconds until cancelled (leading when the lock is free)."""
    guard = Guard(store, config, session, pool)
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                await guard.tick(loop.time())
            except Exception:
                log.exception("guard: tick failed; trying again in %g s", interval)
            await asyncio.sleep(interval)
    finally:
        await guard.aclose()

