"""A webhook URL disabled by a 410 Gone comes back when its tenant re-enables it: the job's
webhook is answered 410, the URL is listed at `GET /v1/webhooks/disabled`, a new job naming it
is refused (400 naming webhook.url), `DELETE /v1/webhooks/disabled?url=` re-enables it, and the
next job's webhook is delivered and verified. Real Postgres, a real receiver on 127.0.0.1
(allowlisted by name), the dispatcher driven by `run_once`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import ClientResponse, web

from services.webhooks.dispatcher import Dispatcher, config_allowlists
from services.webhooks.signing import verify
from tests.gateway.jobs_app import JOBS, JobsApp, jobs_app, row
from tests.gateway.tenancy import add_tenant, bearer
from tests.waiting import wait_for

DISABLED = "/v1/webhooks/disabled"


@dataclass
class Receiver:
    """Answers 410 while `gone`, else 200; verifies each POST with the secret of its job."""

    secrets: dict[str, str] = field(default_factory=dict)
    """job id -> its webhook secret, as `POST /v1/jobs` showed it."""
    events: list[dict[str, Any]] = field(default_factory=list)
    gone: bool = True
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = orjson.loads(body)
        verify(self.secrets[event["data"]["id"]], dict(request.headers), body,
               now=lambda: time.time())
        self.events.append(event)
        return web.Response(status=410 if self.gone else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
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


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[JobsApp]:
    async with jobs_app(database_url) as built:
        yield built


async def _job(app: JobsApp, key: str, hook: Receiver) -> ClientResponse:
    response = await app.client.post(JOBS, headers=bearer(key), json={
        "model": "echo", "inputs": [row(0)], "webhook": {"url": hook.url}})
    if response.status == 202:
        body = await response.json()
        hook.secrets[body["id"]] = body["webhook_secret"]
    return response


async def _delivered(app: JobsApp, dispatcher: Dispatcher, hook: Receiver, key: str,
                     location: str) -> dict[str, Any]:
    """The webhook of the job at `location`, once it finished and the dispatcher sent it."""
    await app.finished(location, key)
    await wait_for(dispatcher.run_once, lambda attempted: attempted == 1, timeout=30,
                   what="the job's webhook attempted")
    return hook.events[-1]


async def test_a_url_disabled_by_410_is_listed_refused_and_re_enabled(
    app: JobsApp, receiver: Receiver, database_url: str
) -> None:
    key = add_tenant(app.config, "acme", webhook_allowlist=["127.0.0.1"])
    other = add_tenant(app.config, "globex", webhook_allowlist=["127.0.0.1"])
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2)
    try:
        dispatcher = Dispatcher(pool, allowlists=config_allowlists(app.config), timeout=5.0)
        app.start_runner()
        first = await _job(app, key, receiver)
        assert first.status == 202, await first.text()
        event = await _delivered(app, dispatcher, receiver, key, first.headers["Location"])
        assert event["type"] == "job.succeeded"  # and answered 410: disabled

        listed = await (await app.client.get(DISABLED, headers=bearer(key))).json()
        assert [(d["url"], d["reason"]) for d in listed["disabled"]] == [
            (receiver.url, "answered 410 Gone")]
        assert (await (await app.client.get(DISABLED, headers=bearer(other))).json()) == {
            "disabled": []}
        refused = await _job(app, key, receiver)
        assert refused.status == 400
        assert "webhook.url: disabled" in (await refused.json())["error"]

        query = {"url": receiver.url}
        assert (await app.client.delete(DISABLED, params=query,
                                        headers=bearer(other))).status == 404
        assert (await app.client.delete(DISABLED, headers=bearer(key))).status == 400
        assert (await app.client.delete(DISABLED, params=query,
                                        headers=bearer(key))).status == 204
        assert (await app.client.delete(DISABLED, params=query,
                                        headers=bearer(key))).status == 404

        receiver.gone = False
        third = await _job(app, key, receiver)
        assert third.status == 202, await third.text()
        event = await _delivered(app, dispatcher, receiver, key, third.headers["Location"])
        assert event["data"]["id"] == (await third.json())["id"]
        rows = await pool.fetch("SELECT status FROM webhook_deliveries ORDER BY created_at")
        assert [r["status"] for r in rows] == ["gone", "delivered"]
        assert (await app.client.get(DISABLED)).status == 401
    finally:
        await pool.close()
