"""`infermesh tenants|keys ...` and `models limit` against a fake control API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from cli.main import main

TOKEN = "s3cret"
KEY = "imk_0123456789ab_c2VjcmV0LXNlY3JldC1zZWNyZXQ"
DEFAULTS = {"burst": 1, "max_concurrency": 64, "allowed_models": None,
            "priority_class": "realtime", "weight": 1, "disabled": False}
KEY_INFO = {"key_id": "0123456789ab", "tenant": "acme", "prefix": "imk_0123456789ab",
            "note": "ci", "created_by": "ops", "created_at": "2025-06-01T12:00:00+00:00",
            "revoked_at": None, "revoked_by": None}


class FakeControl:
    """The tenancy endpoints over in-memory tenants, recording each request as (method,
    path, body)."""

    def __init__(self) -> None:
        self.tenants: dict[str, dict[str, Any]] = {}
        self.limits: dict[str, int] = {}
        self.seen: list[tuple[str, str, Any]] = []
        self.app = web.Application(middlewares=[self._record])
        self.app.router.add_post("/v1/tenants", self._create)
        self.app.router.add_get("/v1/tenants", self._list)
        self.app.router.add_route("*", "/v1/tenants/{tenant}", self._tenant)
        self.app.router.add_post("/v1/tenants/{tenant}/keys", self._issue)
        self.app.router.add_get("/v1/tenants/{tenant}/keys", self._keys)
        self.app.router.add_delete("/v1/keys/{key_id}", self._revoke)
        self.app.router.add_route("*", "/v1/models/{model}/limits", self._limits)

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append((request.method, request.path, orjson.loads(raw) if raw else None))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unknown admin token"}, status=401)
        tenant = request.match_info.get("tenant")
        if tenant is not None and tenant not in self.tenants:
            return web.json_response({"error": f"tenant '{tenant}' not found"}, status=404)
        response: web.StreamResponse = await handler(request)
        return response

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["name"] in self.tenants:
            return web.json_response({"error": "name: tenant 'acme' exists"}, status=409)
        self.tenants[body["name"]] = {**DEFAULTS, **body}
        return web.json_response(self.tenants[body["name"]], status=201)

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response({"tenants": list(self.tenants.values())})

    async def _tenant(self, request: web.Request) -> web.Response:
        record = self.tenants[request.match_info["tenant"]]
        if request.method == "PATCH":
            record.update(await request.json())
        elif request.method == "DELETE":
            record["disabled"] = True
        return web.json_response(record)

    async def _issue(self, request: web.Request) -> web.Response:
        return web.json_response({"key": KEY, **KEY_INFO}, status=201,
                                 headers={"Cache-Control": "no-store"})

    async def _keys(self, request: web.Request) -> web.Response:
        revoked = {**KEY_INFO, "key_id": "ba9876543210", "prefix": "imk_ba9876543210",
                   "note": "", "revoked_at": "2025-06-02T08:00:00+00:00", "revoked_by": "bob"}
        return web.json_response({"keys": [KEY_INFO, revoked]})

    async def _revoke(self, request: web.Request) -> web.Response:
        if request.match_info["key_id"] != KEY_INFO["key_id"]:
            return web.json_response({"error": "API key not found"}, status=404)
        return web.json_response({**KEY_INFO, "revoked_at": "2025-06-03T09:00:00+00:00",
                                  "revoked_by": "ops"})

    async def _limits(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if request.method == "PUT":
            self.limits[model] = (await request.json())["max_concurrency"]
        elif request.method == "DELETE":
            self.limits.pop(model, None)
        elif model not in self.limits:
            return web.json_response({"error": f"model '{model}' has no limits"}, status=404)
        return web.json_response({"model": model, "max_concurrency": self.limits.get(model)})


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeControl]:
    """A fake control API on a real port, named by INFERMESH_CONTROL_URL and _TOKEN."""
    fake = FakeControl()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    monkeypatch.setenv("INFERMESH_CONTROL_URL", f"http://127.0.0.1:{runner.addresses[0][1]}")
    monkeypatch.setenv("INFERMESH_CONTROL_TOKEN", TOKEN)
    try:
        yield fake
    finally:
        await runner.cleanup()


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_tenants_create_sends_only_the_flags_given(
    fake: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("tenants", "create", "acme", "--rate", "100", "--burst", "20",
                     "--models", "mlp,encoder", "--priority", "bulk", "--weight", "0.5") == 0
    assert fake.seen[-1] == ("POST", "/v1/tenants", {
        "name": "acme", "rate": 100, "burst": 20, "allowed_models": ["mlp", "encoder"],
        "priority_class": "bulk", "weight": 0.5})
    shown = capsys.readouterr().out.splitlines()
    assert shown == [
        "tenant acme", "  rate             100/s, burst 20", "  max concurrency  64",
        "  models           mlp, encoder", "  priority         bulk, weight 0.5",
    ]
    assert await cli("tenants", "create", "acme", "--rate", "1") == 1
    assert "409 Conflict: name: tenant 'acme' exists" in capsys.readouterr().err


async def test_tenants_list_show_update_disable(
    fake: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("tenants", "list") == 0
    assert capsys.readouterr().out == "no tenants\n"
    await cli("tenants", "create", "acme", "--rate", "2.5", "--models", "iris")
    await cli("tenants", "create", "zeta", "--rate", "10")
    capsys.readouterr()
    assert await cli("tenants", "update", "acme", "--max-concurrency", "8", "--all-models") == 0
    assert fake.seen[-1] == ("PATCH", "/v1/tenants/acme",
                             {"max_concurrency": 8, "allowed_models": None})
    assert await cli("tenants", "disable", "zeta") == 0
    assert fake.seen[-1][:2] == ("DELETE", "/v1/tenants/zeta")
    assert "tenant zeta  (disabled: requests are refused)" in capsys.readouterr().out
    assert await cli("tenants", "list") == 0
    assert [line.split() for line in capsys.readouterr().out.splitlines()] == [
        ["NAME", "RATE", "BURST", "CONCURRENCY", "PRIORITY", "WEIGHT", "MODELS", "STATUS"],
        ["acme", "2.5/s", "1", "8", "realtime", "1", "all", "active"],
        ["zeta", "10/s", "1", "64", "realtime", "1", "all", "disabled"],
    ]
    assert await cli("tenants", "show", "acme", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["max_concurrency"] == 8
    assert await cli("tenants", "enable", "zeta") == 0
    assert fake.seen[-1] == ("PATCH", "/v1/tenants/zeta", {"disabled": False})


async def test_keys_issue_prints_the_key_alone_and_warns_on_stderr(
    fake: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    await cli("tenants", "create", "acme", "--rate", "1")
    capsys.readouterr()
    assert await cli("keys", "issue", "acme", "--note", "ci") == 0
    assert fake.seen[-1] == ("POST", "/v1/tenants/acme/keys", {"note": "ci"})
    out, err = capsys.readouterr()
    assert out == KEY + "\n"
    assert "store it now: it is not shown again" in err and KEY not in err
    assert await cli("keys", "issue", "acme", "--json") == 0
    assert fake.seen[-1] == ("POST", "/v1/tenants/acme/keys", {})
    assert orjson.loads(capsys.readouterr().out) == {"key": KEY, **KEY_INFO}


async def test_keys_list_and_revoke(fake: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    await cli("tenants", "create", "acme", "--rate", "1")
    capsys.readouterr()
    assert await cli("keys", "list", "acme") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "ID", "PREFIX", "STATUS", "CREATED", "BY", "NOTE"]
    assert lines[1].split()[:3] == ["0123456789ab", "imk_0123456789ab", "active"]
    assert "revoked 2025-06-02T08:00:00+00:00 by bob" in lines[2]
    for given in ("0123456789ab", "imk_0123456789ab", KEY):  # the id, the prefix, the key
        assert await cli("keys", "revoke", given) == 0
        assert fake.seen[-1][:2] == ("DELETE", "/v1/keys/0123456789ab")
    assert capsys.readouterr().out.splitlines()[0] == (
        "revoked API key 0123456789ab of tenant acme at 2025-06-03T09:00:00+00:00")
    assert await cli("keys", "revoke", "fedcba987654") == 1
    assert "404 Not Found" in capsys.readouterr().err
    assert await cli("keys", "list", "nope") == 1


async def test_models_limit_show_set_clear(
    fake: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("models", "limit", "iris") == 0
    assert capsys.readouterr().out == "model iris: no concurrency limit\n"
    assert await cli("models", "limit", "iris", "--max-concurrency", "8") == 0
    assert fake.seen[-1] == ("PUT", "/v1/models/iris/limits", {"max_concurrency": 8})
    assert capsys.readouterr().out == "model iris: at most 8 requests in flight (all tenants)\n"
    assert await cli("models", "limit", "iris", "--json") == 0
    assert orjson.loads(capsys.readouterr().out) == {"model": "iris", "max_concurrency": 8}
    assert await cli("models", "limit", "iris", "--clear") == 0
    assert fake.seen[-1][:2] == ("DELETE", "/v1/models/iris/limits")
    assert capsys.readouterr().out == "model iris: no concurrency limit\n"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["tenants", "create", "acme"], "--rate"),
        (["tenants", "create", "acme", "--rate", "0"], "--rate"),
        (["tenants", "create", "acme", "--rate", "1", "--burst", "1.5"], "--burst"),
        (["tenants", "create", "acme", "--rate", "1", "--priority", "urgent"], "--priority"),
        (["tenants", "create", "acme", "--rate", "1", "--models", "a,,b"], "--models"),
        (["tenants", "update", "acme", "--models", "a", "--all-models"], "--all-models"),
        (["tenants", "update", "acme"], "nothing to change"),
        (["models", "limit", "iris", "--max-concurrency", "0"], "--max-concurrency"),
        (["models", "limit", "iris", "--max-concurrency", "2", "--clear"], "--clear"),
    ],
)
async def test_usage_errors_exit_2_naming_the_flag(
    fake: FakeControl, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    assert await cli(*argv) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert all(method == "GET" for method, _, _ in fake.seen)  # nothing was written


async def test_a_missing_token_is_401_with_the_hint(
    fake: FakeControl, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    monkeypatch.delenv("INFERMESH_CONTROL_TOKEN")
    assert await cli("tenants", "list", "--state-dir", str(tmp_path)) == 1
    assert "401" in capsys.readouterr().err
