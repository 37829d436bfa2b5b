from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from cli.main import main
from deploy.localdeps import free_port

TOKEN = "s3cret"
ROLLOUT: dict[str, Any] = {
    "model": "iris", "routes": [{"version": "v1", "weight": 90}, {"version": "v2", "weight": 10}],
    "sticky_key": "user", "salt": "s1", "shadow": [{"version": "v3", "fraction": 0.25}],
    "fallback": "v1", "epoch": 7, "guard": {"steps": [5, 25]},
    "updated_at": "2025-06-01T12:00:00+00:00",
}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeControl:
    """The control API's rollout endpoints over one model, recording every request."""

    def __init__(self) -> None:
        self.rollout = copy.deepcopy(ROLLOUT)
        self.seen: list[Seen] = []
        self.app = web.Application(middlewares=[self._record])
        self.app.router.add_get("/v1/rollouts/{model}", self._get)
        self.app.router.add_put("/v1/rollouts/{model}", self._put)
        self.app.router.add_post("/v1/rollouts/{model}/rollback", self._rollback)
        self.app.router.add_get("/v1/rollouts/{model}/history", self._history)

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers),
                              orjson.loads(raw) if raw else None))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "missing or unknown bearer token"}, status=401)
        if request.match_info["model"] != "iris":
            return web.json_response({"error": "no rollout for model 'wine'"}, status=404)
        response: web.StreamResponse = await handler(request)
        return response

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(self.rollout, headers={"ETag": f'"{self.rollout["epoch"]}"'})

    async def _put(self, request: web.Request) -> web.Response:
        epoch = self.rollout["epoch"]
        if request.headers.get("If-Match", f'"{epoch}"') != f'"{epoch}"':
            error = f"the rollout of 'iris' is at epoch {epoch}, not {request.headers['If-Match']}"
            return web.json_response({"error": error, "epoch": epoch}, status=412)
        body = await request.json()
        body.pop("reason", None)
        self.rollout = {"model": "iris", "guard": None, **body, "epoch": epoch + 1}
        return web.json_response(self.rollout)

    async def _rollback(self, request: web.Request) -> web.Response:
        restored = {k: v for k, v in ROLLOUT.items() if k != "updated_at"}
        self.rollout = {**restored, "routes": [{"version": "v1", "weight": 100}], "guard": None,
                        "epoch": self.rollout["epoch"] + 1}
        return web.json_response(self.rollout)

    async def _history(self, request: web.Request) -> web.Response:
        older = {**ROLLOUT, "routes": [{"version": "v1", "weight": 100}], "epoch": 6}
        return web.json_response({"model": "iris", "history": [
            {"epoch": 7, "author": "guard", "reason": "advanced v2 from 5% to 10%",
             "created_at": "2025-06-01T12:00:00+00:00", "record": ROLLOUT},
            {"epoch": 6, "author": "alice", "reason": "",
             "created_at": "2025-06-01T11:00:00+00:00", "record": older},
        ]})


@pytest.fixture
async def control(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, FakeControl]]:
    """A fake control API on a real port; its URL is in INFERMESH_CONTROL_URL."""
    fake = FakeControl()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    monkeypatch.setenv("INFERMESH_CONTROL_URL", url)
    monkeypatch.setenv("INFERMESH_CONTROL_TOKEN", TOKEN)
    try:
        yield url, fake
    finally:
        await runner.cleanup()


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_rollout_show_as_text_and_json(
    control: tuple[str, FakeControl], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("rollout", "show", "iris") == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "rollout iris  epoch 7  updated 2025-06-01T12:00:00+00:00"
    assert [line.split(None, 1)[1] if line.startswith("  sticky") else line.split()[1:]
            for line in shown[1:]] == [
        ["v1=90", "v2=10"], ["v1"], "key  user", ["s1"], ["v3=0.25"], ["steps=[5,25]"],
    ]

    assert await cli("rollout", "show", "iris", "--json") == 0
    assert orjson.loads(capsys.readouterr().out) == ROLLOUT
    assert control[1].seen[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_rollout_set_sends_the_epoch_read_and_keeps_the_shadow(
    control: tuple[str, FakeControl], capsys: pytest.CaptureFixture[str]
) -> None:
    _, fake = control
    code = await cli("rollout", "set", "iris", "v1=75", "v2=25", "--steps", "5,25,50,100",
                     "--reason", "ramp up")

    assert code == 0
    get, put = fake.seen
    assert (get.method, put.method, put.path) == ("GET", "PUT", "/v1/rollouts/iris")
    assert put.headers["If-Match"] == '"7"'
    assert put.body == {
        "routes": [{"version": "v1", "weight": 75}, {"version": "v2", "weight": 25}],
        "sticky_key": "user", "salt": "s1", "shadow": [{"version": "v3", "fraction": 0.25}],
        "fallback": "v1", "guard": {"steps": [5, 25, 50, 100]}, "reason": "ramp up",
    }
    out = capsys.readouterr().out
    assert out.startswith("rollout iris  epoch 8\n") and "v1=75 v2=25" in out


async def test_rollout_set_options_replace_what_was_read(
    control: tuple[str, FakeControl]
) -> None:
    _, fake = control
    code = await cli("rollout", "set", "iris", "v2=100", "--sticky-key", "session",
                     "--salt", "s2", "--fallback", "v2", "--guard", '{"min_samples": 100}')

    assert code == 0
    put = fake.seen[-1].body
    assert (put["sticky_key"], put["salt"], put["fallback"]) == ("session", "s2", "v2")
    assert put["guard"] == {"min_samples": 100} and "reason" not in put

    assert await cli("rollout", "set", "iris", "v3=100") == 0
    assert "fallback" not in fake.seen[-1].body  # v2 is no longer routed
    assert "guard" not in fake.seen[-1].body and fake.seen[-1].body["salt"] == "s2"


async def test_a_stale_if_match_fails_with_the_status_and_the_current_epoch(
    control: tuple[str, FakeControl], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("rollout", "set", "iris", "v1=50", "v2=50", "--if-match", "3") == 1

    assert control[1].seen[-1].headers["If-Match"] == '"3"'
    assert capsys.readouterr().err == (
        "infermesh: error: 412 Precondition Failed: the rollout of 'iris' is at epoch 7, "
        "not \"3\" (current epoch 7: see `infermesh rollout show iris`)\n"
    )


@pytest.mark.parametrize(("argv", "named"), [
    (["rollout", "set", "iris", "v1:90"], "argument VERSION=WEIGHT: 'v1:90' is not"),
    (["rollout", "set", "iris", "v1=ninety"], "argument VERSION=WEIGHT: 'v1=ninety' is not"),
    (["rollout", "set", "iris", "v1=-5"], "argument VERSION=WEIGHT: 'v1=-5': the weight"),
    (["rollout", "set", "iris", "=5"], "argument VERSION=WEIGHT: '=5' is not"),
    (["rollout", "set", "iris", "v1=90", "--guard", "[1]"], "argument --guard: '[1]' is not"),
    (["rollout", "set", "iris", "v1=90", "--steps", "5,x"], "argument --steps: '5,x' is not"),
    (["rollout", "set", "iris"], "the following arguments are required: VERSION=WEIGHT"),
    (["rollout", "shadow", "iris", "v2=1.5"], "argument VERSION=FRACTION: 'v2=1.5': the frac"),
    (["rollout", "shadow", "iris"], "one of the arguments VERSION=FRACTION --off is required"),
    (["rollout", "shadow", "iris", "v2=0.5", "--off"], "not allowed with argument"),
    (["rollback", "iris", "--to-epoch", "0"], "argument --to-epoch: '0' is not"),
])
async def test_usage_errors_exit_2_naming_the_argument(
    control: tuple[str, FakeControl], capsys: pytest.CaptureFixture[str],
    argv: list[str], named: str,
) -> None:
    assert await cli(*argv) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err
    assert control[1].seen == []


async def test_shadow_changes_only_the_shadow(control: tuple[str, FakeControl]) -> None:
    _, fake = control
    assert await cli("rollout", "shadow", "iris", "v2=0.5", "v3=0.1") == 0

    put = fake.seen[-1]
    assert put.headers["If-Match"] == '"7"'
    assert put.body == {
        "routes": ROLLOUT["routes"], "sticky_key": "user", "salt": "s1", "fallback": "v1",
        "guard": {"steps": [5, 25]},
        "shadow": [{"version": "v2", "fraction": 0.5}, {"version": "v3", "fraction": 0.1}],
    }

    assert await cli("rollout", "shadow", "iris", "--off", "--reason", "enough") == 0
    assert fake.seen[-1].headers["If-Match"] == '"8"'
    assert fake.seen[-1].body["shadow"] == [] and fake.seen[-1].body["reason"] == "enough"


async def test_history_table_and_limit(
    control: tuple[str, FakeControl], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("rollout", "history", "iris", "--limit", "2") == 0

    assert control[1].seen[-1].path == "/v1/rollouts/iris/history?limit=2"
    header, newest, older = capsys.readouterr().out.splitlines()
    assert header.split() == ["EPOCH", "WHEN", "AUTHOR", "ROUTES", "REASON"]
    assert newest.split(None, 4) == ["7", "2025-06-01T12:00:00+00:00", "guard", "v1=90",
                                     "v2=10  advanced v2 from 5% to 10%"]
    assert older.split() == ["6", "2025-06-01T11:00:00+00:00", "alice", "v1=100"]
    assert newest.index("guard") == header.index("AUTHOR")


async def test_rollback_posts_the_epoch_and_reason(
    control: tuple[str, FakeControl], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("rollback", "iris", "--to-epoch", "5", "--reason", "oops") == 0

    post = control[1].seen[-1]
    assert (post.method, post.path, post.body) == (
        "POST", "/v1/rollouts/iris/rollback", {"epoch": 5, "reason": "oops"})
    out = capsys.readouterr().out
    assert out.startswith("rolled back iris\nrollout iris  epoch 8\n") and "v1=100" in out

    assert await cli("rollback", "iris") == 0
    assert control[1].seen[-1].body == {}


async def test_token_from_the_state_dir_and_401_explains_where_tokens_come_from(
    control: tuple[str, FakeControl], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("INFERMESH_CONTROL_TOKEN")
    (tmp_path / "control-token").write_text(f"{TOKEN}\n")
    assert await cli("rollout", "show", "iris", "--state-dir", str(tmp_path)) == 0
    assert control[1].seen[-1].headers["Authorization"] == f"Bearer {TOKEN}"
    capsys.readouterr()

    assert await cli("rollout", "show", "iris", "--state-dir", str(tmp_path / "none")) == 1
    assert "Authorization" not in control[1].seen[-1].headers
    err = capsys.readouterr().err
    assert err.startswith("infermesh: error: 401 Unauthorized: missing or unknown bearer token")
    assert f"{tmp_path / 'none' / 'control-token'}" in err and err.count("\n") == 1

    assert await cli("rollout", "show", "iris", "--token", "wrong") == 1
    assert control[1].seen[-1].headers["Authorization"] == "Bearer wrong"


async def test_not_found_and_unreachable_exit_1(
    control: tuple[str, FakeControl], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("rollout", "show", "wine") == 1
    assert capsys.readouterr().err == (
        "infermesh: error: 404 Not Found: no rollout for model 'wine'\n")

    down = f"http://127.0.0.1:{free_port()}"
    assert await cli("rollout", "history", "iris", "--control", down) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"infermesh: error: cannot reach the control API at {down}")
    assert err.count("\n") == 1
