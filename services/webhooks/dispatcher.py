"""The delivery loop: claim due webhook rows, POST them signed, record every attempt, retry.

One loop per gateway process (services/gateway/wiring.py). Several gateways share the table
safely: a claim takes due rows with `FOR UPDATE SKIP LOCKED` and, in the same statement, pushes
their `next_attempt_at` out by a lease and counts the attempt, so no two dispatchers send the
same attempt, and a dispatcher that dies mid-POST leaves the row to be retried when the lease
runs out (at-least-once; the unchanged webhook-id lets the receiver drop the duplicate).

Before each POST the target is checked again (allowlist and addresses, see `targets`) and the
connection is made only to the addresses that check returned (`PinnedResolver`): a DNS answer
that changed since the job was created (rebinding) cannot steer the POST inside the network.
Redirects are not followed, for the same reason.

Outcomes: 2xx delivered; 410 Gone stops and disables that URL for the tenant until the tenant
re-enables it (`endpoints`, `DELETE /v1/webhooks/disabled` on the gateway); anything
else (other statuses, connection errors, timeouts) retries per `backoff`, honouring Retry-After,
until the schedule runs out (failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import asyncpg
from aiohttp.abc import AbstractResolver, ResolveResult

from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tenancy import Tenant
from services.mesh.infra.db import create_pool
from services.webhooks import signing
from services.webhooks.backoff import DEFAULT_SCHEDULE, next_delay, parse_retry_after, utc
from services.webhooks.metrics import WebhookMetrics
from services.webhooks.targets import AsyncResolve, Target, check_target_async

log = logging.getLogger(__name__)

SessionFactory = Callable[[AbstractResolver], aiohttp.ClientSession]
"""Builds the HTTP session of one delivery around the resolver pinned to its checked target."""
AllowlistLookup = Callable[[str], Sequence[str] | None]
"""A tenant's current webhook_allowlist; None when the tenant is unknown."""

CLAIM = """
UPDATE webhook_deliveries AS d SET attempts = d.attempts + 1, next_attempt_at = $2
FROM (
    SELECT id FROM webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= $1
    ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED
) AS due
WHERE d.id = due.id
RETURNING d.id, d.tenant, d.url, d.secret, d.body, d.attempts
"""
DISABLED = "SELECT reason FROM webhook_disabled_endpoints WHERE tenant = $1 AND url = $2"
ATTEMPT = """
INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, error, duration_ms)
VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING
"""
FINISH = """
UPDATE webhook_deliveries SET status = $3, finished_at = $4, last_error = $5
WHERE id = $1 AND attempts = $2 AND status = 'pending'
"""
RESCHEDULE = """
UPDATE webhook_deliveries SET next_attempt_at = $3, last_error = $4
WHERE id = $1 AND attempts = $2 AND status = 'pending'
"""
DISABLE = """
INSERT INTO webhook_disabled_endpoints (tenant, url, reason) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING
"""
_DB_DOWN = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PinnedResolver(AbstractResolver):
    """Resolves only the checked target's host, and only to the addresses that were checked."""

    def __init__(self, target: Target) -> None:
        self._target = target

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[ResolveResult]:
        if host.rstrip(".").lower() != self._target.host:
            raise OSError(f"webhook delivery may not connect to {host!r}")
        found: list[ResolveResult] = []
        for address in self._target.addresses:
            kind = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (socket.AF_UNSPEC, kind):
                found.append(ResolveResult(hostname=host, host=address, port=port, family=kind,
                                           proto=0, flags=socket.AI_NUMERICHOST))
        if not found:
            raise OSError(f"no checked address of {host!r} in family {family!r}")
        return found

    async def close(self) -> None:
        return None


def webhook_session(resolver: AbstractResolver) -> aiohttp.ClientSession:
    """A session that resolves through `resolver` only, ignores proxy variables, keeps no
    connection (each delivery re-checks its target, so each opens its own)."""
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, force_close=True)
    return aiohttp.ClientSession(connector=connector, trust_env=False)


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: str
    tenant: str
    url: str
    secret: str
    body: bytes
    attempt: int


@dataclass(frozen=True, slots=True)
class _Outcome:
    status_code: int | None
    error: str | None
    retry_after: float | None = None
    final: str | None = None
    """'delivered', 'gone' or 'failed' when no retry may follow whatever the schedule says."""


class Dispatcher:
    """Delivers queued webhooks until closed. `start()` and `aclose()` are idempotent, so
    whoever wires it may call them more than once; a closed dispatcher cannot start again."""

    def __init__(
        self, pool: asyncpg.Pool, session_factory: SessionFactory = webhook_session, *,
        clock: Callable[[], float] = time.time, allowlists: AllowlistLookup | None = None,
        schedule: Sequence[float] = DEFAULT_SCHEDULE, timeout: float = 10.0,
        poll_interval: float = 1.0, batch: int = 16, rand: Callable[[], float] = random.random,
        resolve: AsyncResolve | None = None, metrics: WebhookMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._metrics = metrics if metrics is not None else WebhookMetrics()
        self._session_factory = session_factory
        self._clock = clock
        self._allowlists = allowlists
        """None: no allowlist known here, so only public addresses pass the delivery check."""
        self._schedule = tuple(schedule)
        self._timeout = timeout
        self._lease = timeout + 30.0
        """How long a claimed row stays invisible to other dispatchers."""
        self._poll_interval = poll_interval
        self._batch = batch
        self._rand = rand
        self._resolve = resolve
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the loop (once; later calls do nothing)."""
        if self._closed:
            raise RuntimeError("this webhook dispatcher is closed")
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def aclose(self) -> None:
        """Stop the loop; a POST in flight is abandoned and retried after its lease."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def wake(self) -> None:
        """Look for due deliveries now instead of at the next poll (after an enqueue)."""
        if self._wakeup is not None:
            self._wakeup.set()

    async def run_once(self) -> int:
        """Claim the deliveries due now and attempt each; how many were attempted."""
        now = self._clock()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(CLAIM, utc(now), utc(now + self._lease), self._batch)
        claimed = [_Claimed(r["id"], r["tenant"], r["url"], r["secret"], bytes(r["body"]),
                            r["attempts"]) for r in rows]
        await asyncio.gather(*(self._attempt(item) for item in claimed))
        return len(claimed)

    async def _run(self) -> None:
        assert self._wakeup is not None
        failing = False
        while True:
            try:
                attempted = await self.run_once()
            except _DB_DOWN as exc:
                if not failing:  # once per outage, not once per poll
                    log.warning("webhook dispatcher cannot reach Postgres (%r); retrying", exc)
                failing, attempted = True, 0
            else:
                if failing:
                    log.info("webhook dispatcher reaches Postgres again")
                failing = False
            if attempted < self._batch:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._poll_interval)
                except TimeoutError:
                    pass
                self._wakeup.clear()

    async def _attempt(self, item: _Claimed) -> None:
        started, began = self._clock(), time.monotonic()
        try:
            outcome = await self._send(item)
        except _DB_DOWN:
            raise
        except Exception as exc:  # a bug must not kill the loop; the lease retries the row
            log.exception("webhook delivery %s failed unexpectedly", item.id)
            outcome = _Outcome(None, f"internal error: {type(exc).__name__}")
        duration_ms = (time.monotonic() - began) * 1000.0
        self._metrics.attempt_seconds.observe(duration_ms / 1000.0)
        try:
            await self._record(item, outcome, started, duration_ms)
        except _DB_DOWN as exc:
            log.warning("cannot record webhook attempt %s #%d (%r)", item.id, item.attempt, exc)

    async def _send(self, item: _Claimed) -> _Outcome:
        async with self._pool.acquire() as conn:
            reason = await conn.fetchval(DISABLED, item.tenant, item.url)
        if reason is not None:
            return _Outcome(None, f"endpoint disabled: {reason}", final="gone")
        allowlist = ["*"] if self._allowlists is None else self._allowlists(item.tenant)
        if allowlist is None:
            return _Outcome(None, f"tenant {item.tenant!r} is unknown", final="failed")
        try:
            target = await check_target_async(item.url, allowlist, resolve=self._resolve)
        except InvalidInput as exc:
            return _Outcome(None, f"target refused: {exc.message}", final="failed")
        timestamp = int(self._clock())
        headers = signing.headers(item.secret, item.id, timestamp, item.body)
        try:
            async with self._session_factory(PinnedResolver(target)) as session:
                async with session.post(
                    item.url, data=item.body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                ) as response:
                    code = response.status
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), now=self._clock()
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _Outcome(None, f"{type(exc).__name__}: {exc}"[:500])
        if 200 <= code < 300:
            return _Outcome(code, None, final="delivered")
        if code == 410:
            return _Outcome(code, "410 Gone: the receiver asked to stop", final="gone")
        return _Outcome(code, f"HTTP {code}", retry_after=retry_after)

    async def _record(
        self, item: _Claimed, outcome: _Outcome, started: float, duration_ms: float
    ) -> None:
        final = outcome.final
        delay = None
        if final is None:
            delay = next_delay(item.attempt, self._schedule, retry_after=outcome.retry_after,
                               rand=self._rand)
            final = "failed" if delay is None else None
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(ATTEMPT, item.id, item.attempt, utc(started), outcome.status_code,
                               outcome.error, duration_ms)
            if final is None:
                assert delay is not None
                await conn.execute(RESCHEDULE, item.id, item.attempt,
                                   utc(self._clock() + delay), outcome.error)
            else:
                await conn.execute(FINISH, item.id, item.attempt, final, utc(self._clock()),
                                   outcome.error)
                if final == "gone" and outcome.status_code == 410:
                    await conn.execute(DISABLE, item.tenant, item.url, "answered 410 Gone")
        self._metrics.deliveries.labels(final or "retried").inc()
        if final not in (None, "delivered"):
            log.warning("webhook %s to %s stopped (%s): %s", item.id, item.url, final,
                        outcome.error)


def config_allowlists(config: ConfigView) -> AllowlistLookup:
    """Each tenant's webhook_allowlist as last published under `tenants/{tenant}`."""

    def lookup(tenant: str) -> Sequence[str] | None:
        raw = config.get(f"tenants/{tenant}")
        return None if raw is None else Tenant.from_json(raw).webhook_allowlist

    return lookup


@contextlib.asynccontextmanager
async def open_dispatcher(
    dsn: str, *, allowlists: AllowlistLookup, close_timeout: float = 5.0,
    metrics: WebhookMetrics | None = None,
) -> AsyncIterator[Dispatcher]:
    """A started dispatcher over its own small pool for `dsn`; stopped, then the pool closed,
    on exit. Opens no connection at start: Postgres may be down (the loop retries)."""
    pool = await create_pool(dsn, min_size=0, max_size=2)
    dispatcher = Dispatcher(pool, allowlists=allowlists, metrics=metrics)
    try:
        await dispatcher.start()
        yield dispatcher
    finally:
        await dispatcher.aclose()
        try:
            await asyncio.wait_for(pool.close(), close_timeout)
        except TimeoutError:
            pool.terminate()
