"""The dispatcher against a real aiohttp receiver on 127.0.0.1 (allowlisted by name) and real
Postgres: signatures the receiver verifies, retries under one webhook-id, Retry-After, 410,
every attempt recorded. A hand-driven clock and `run_once` keep it fast and deterministic."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.mesh.domain.config import LocalConfig
from services.mesh.domain.tenancy import Tenant
from services.mesh.infra.db import create_pool, migrate
from services.webhooks.dispatcher import Dispatcher, config_allowlists, open_dispatcher
from services.webhooks.metrics import WebhookMetrics
from services.webhooks.outbox import enqueue
from services.webhooks.signing import InvalidSignature, new_secret, verify
from tests.waiting import wait_for


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@dataclass
class Receiver:
    """Answers with the scripted (status, headers) in turn, then 200; verifies every POST."""

    secret: str
    clock: Clock
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(self.secret, dict(request.headers), body, now=self.clock)
        except InvalidSignature as exc:
            return web.Response(status=401, text=str(exc))
        assert request.headers["content-type"] == "application/json"
        self.ids.append(request.headers["webhook-id"])
        self.bodies.append(body)
        status, headers = self.script.pop(0) if self.script else (200, {})
        return web.Response(status=status, headers=headers)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url)
    await migrate(pool)
    yield pool
    await pool.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver(new_secret(), Clock(1_900_000_000.0))
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hook.url = f"http://127.0.0.1:{port}/hook"
    yield hook
    await runner.cleanup()


def _dispatcher(pool: asyncpg.Pool, clock: Clock, allowlist: list[str] | None = None) -> Dispatcher:
    allowed = ["127.0.0.1"] if allowlist is None else allowlist
    return Dispatcher(pool, clock=clock, allowlists=lambda tenant: allowed,
                      schedule=(10, 10, 10), rand=lambda: 1.0, timeout=5.0)


async def _enqueue(pool: asyncpg.Pool, hook: Receiver) -> str:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue(conn, tenant="acme", url=hook.url, secret=hook.secret,
                             event_type="job.succeeded", payload={"job": "j1", "rows": 3})


async def _state(pool: asyncpg.Pool, msg_id: str) -> tuple[str, list[tuple[int, int | None]]]:
    status = await pool.fetchval("SELECT status FROM webhook_deliveries WHERE id = $1", msg_id)
    rows = await pool.fetch("SELECT attempt, status_code FROM webhook_attempts"
                            " WHERE delivery_id = $1 ORDER BY attempt", msg_id)
    return status, [(r["attempt"], r["status_code"]) for r in rows]


async def test_a_failing_receiver_gets_retries_under_one_webhook_id(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    clock = receiver.clock
    receiver.script = [(500, {}), (500, {})]
    dispatcher = _dispatcher(pool, clock)
    msg_id = await _enqueue(pool, receiver)
    assert msg_id.startswith("msg_")
    for _ in range(3):
        assert await dispatcher.run_once() == 1
        assert await dispatcher.run_once() == 0  # not due again until the backoff passes
        clock.now += 10
    assert receiver.ids == [msg_id] * 3 and len(set(receiver.bodies)) == 1
    assert await _state(pool, msg_id) == ("delivered", [(1, 500), (2, 500), (3, 200)])


async def test_retry_after_is_honoured_and_the_schedule_ends_in_failed(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    clock = receiver.clock
    receiver.script = [(503, {"Retry-After": "120"})] + [(500, {})] * 3
    dispatcher = _dispatcher(pool, clock)
    msg_id = await _enqueue(pool, receiver)
    assert await dispatcher.run_once() == 1
    clock.now += 100  # past the 10 s step, not past Retry-After
    assert await dispatcher.run_once() == 0
    clock.now += 21
    for _ in range(3):
        assert await dispatcher.run_once() == 1
        clock.now += 10
    assert await dispatcher.run_once() == 0
    status, attempts = await _state(pool, msg_id)
    assert status == "failed" and attempts == [(1, 503), (2, 500), (3, 500), (4, 500)]


async def test_410_stops_and_disables_the_endpoint(pool: asyncpg.Pool, receiver: Receiver) -> None:
    clock = receiver.clock
    receiver.script = [(410, {})]
    dispatcher = _dispatcher(pool, clock)
    first = await _enqueue(pool, receiver)
    assert await dispatcher.run_once() == 1
    clock.now += 1000
    second = await _enqueue(pool, receiver)
    assert await dispatcher.run_once() == 1  # the second, refused without a POST
    assert receiver.ids == [first]
    assert await _state(pool, first) == ("gone", [(1, 410)])
    assert await _state(pool, second) == ("gone", [(1, None)])


async def test_a_target_no_longer_allowed_is_refused_at_delivery(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    dispatcher = _dispatcher(pool, receiver.clock, allowlist=["*"])  # public addresses only
    msg_id = await _enqueue(pool, receiver)
    assert await dispatcher.run_once() == 1
    assert receiver.ids == []
    error = await pool.fetchval("SELECT error FROM webhook_attempts WHERE delivery_id = $1",
                                msg_id)
    assert "loopback" in error
    assert (await _state(pool, msg_id))[0] == "failed"


async def test_the_wired_loop_delivers_with_published_allowlists(
    database_url: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    receiver.clock.now = time.time()  # the loop signs with the real clock
    tenant = Tenant("acme", rate=1, burst=1, max_concurrency=1, webhook_allowlist=("127.0.0.1",))
    config = LocalConfig({"tenants/acme": tenant.to_json()})
    async with open_dispatcher(database_url, allowlists=config_allowlists(config)) as dispatcher:
        await dispatcher.start()  # idempotent
        msg_id = await _enqueue(pool, receiver)
        dispatcher.wake()
        await wait_for(lambda: _state(pool, msg_id), lambda s: s[0] == "delivered", timeout=20,
                       what="the webhook delivered by the loop")
    await dispatcher.aclose()  # idempotent
    with pytest.raises(RuntimeError):
        await dispatcher.start()
    assert receiver.ids == [msg_id]


async def test_a_named_target_connects_only_to_the_address_checked_at_delivery(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    answers = {"hooks.test": ["127.0.0.1"]}

    async def dns(host: str, port: int) -> list[str]:
        return answers[host]

    receiver.url = receiver.url.replace("127.0.0.1", "hooks.test")
    named = Dispatcher(pool, clock=receiver.clock, allowlists=lambda tenant: ["hooks.test"],
                       schedule=(10,), rand=lambda: 1.0, resolve=dns)
    first = await _enqueue(pool, receiver)
    assert await named.run_once() == 1  # reached through the pinned 127.0.0.1
    assert (await _state(pool, first))[0] == "delivered"
    suffix = Dispatcher(pool, clock=receiver.clock, allowlists=lambda tenant: ["*.test"],
                        resolve=dns)  # the same answer, now only a suffix entry: rebinding
    second = await _enqueue(pool, receiver)
    assert await suffix.run_once() == 1
    assert (await _state(pool, second))[0] == "failed" and receiver.ids == [first]


async def test_every_outcome_and_attempt_reaches_the_metrics_text(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    clock, metrics = receiver.clock, WebhookMetrics()
    receiver.script = [(500, {}), (200, {}), (410, {})]
    dispatcher = Dispatcher(pool, clock=clock, allowlists=lambda tenant: ["127.0.0.1"],
                            schedule=(10,), rand=lambda: 1.0, timeout=5.0, metrics=metrics)
    await _enqueue(pool, receiver)
    for _ in range(2):  # 500 (retried), then 200 (delivered)
        assert await dispatcher.run_once() == 1
        clock.now += 10
    await _enqueue(pool, receiver)
    assert await dispatcher.run_once() == 1  # 410 (gone)
    await _enqueue(pool, receiver)
    assert await dispatcher.run_once() == 1  # disabled: gone without a POST
    receiver.url = receiver.url.replace("/hook", "/other")  # 404 twice: retried, failed
    await _enqueue(pool, receiver)
    for _ in range(2):
        assert await dispatcher.run_once() == 1
        clock.now += 10
    samples = {(s.name, s.labels.get("outcome")): s.value
               for family in text_string_to_metric_families(generate_latest(metrics.registry)
                                                             .decode())
               for s in family.samples}
    assert {outcome: samples["infermesh_webhook_deliveries_total", outcome]
            for outcome in ("delivered", "retried", "gone", "failed")} == {
        "delivered": 1, "retried": 2, "gone": 2, "failed": 1}
    assert samples["infermesh_webhook_attempt_seconds_count", None] == 6
