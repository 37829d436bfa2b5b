from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control.api.auth import auth_middleware, author_of, load_tokens
from control.api.settings import ControlSettings
from services.mesh.domain.errors import InvalidInput, Unauthenticated
from services.mesh.infra.settings import load_settings
from services.mesh.transport.rest import error_middleware


def test_tokens_come_from_the_environment_and_the_file(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# admins\n\ncarol:carol-secret\n dave : dave-secret \n")
    settings = load_settings(ControlSettings, "control", {
        "INFERMESH_CONTROL_ADMIN_TOKENS": "alice:a-secret, bob:b:with:colons",
        "INFERMESH_CONTROL_ADMIN_TOKEN_FILE": str(token_file),
    })
    assert load_tokens(settings) == {
        "a-secret": "alice", "b:with:colons": "bob", "carol-secret": "carol",
        "dave-secret": "dave",
    }


@pytest.mark.parametrize(
    ("tokens", "file_text", "message"),
    [
        ((), None, "no admin token configured"),
        (("alice",), None, "admin_tokens: entry 1 is not name:secret"),
        (("alice:", ), None, "admin_tokens: entry 1 is not name:secret"),
        (("alice:s", "bob:s"), None, "admin_tokens: tokens 'alice' and 'bob' share a secret"),
        (("alice:s",), "bob:s\n", "admin_token_file: token 'bob' reuses a secret"),
        ((), "ok:x\n:nameless\n", "admin_token_file: entry 2 is not name:secret"),
    ],
)
def test_bad_token_settings_are_named(
    tmp_path: Path, tokens: tuple[str, ...], file_text: str | None, message: str
) -> None:
    token_file = ""
    if file_text is not None:
        (tmp_path / "tokens").write_text(file_text)
        token_file = str(tmp_path / "tokens")
    settings = ControlSettings(admin_tokens=tokens, admin_token_file=token_file)
    with pytest.raises(InvalidInput) as caught:
        load_tokens(settings)
    assert caught.value.message.startswith(message)


def test_an_unreadable_token_file_is_named(tmp_path: Path) -> None:
    settings = ControlSettings(admin_token_file=str(tmp_path / "missing"))
    with pytest.raises(InvalidInput, match="^admin_token_file: cannot read .*missing"):
        load_tokens(settings)


def test_author_of_a_bearer_token() -> None:
    tokens = {b"a-secret": "alice", b"b-secret": "bob"}
    assert author_of("Bearer b-secret", tokens) == "bob"
    assert author_of("bearer  a-secret ", tokens) == "alice"
    for header in (None, "", "Bearer", "Bearer a-secre", "Token a-secret", "Bearer a-secret2"):
        with pytest.raises(Unauthenticated):
            author_of(header, tokens)


async def _rollouts(request: web.Request) -> web.Response:
    return web.json_response([])


async def test_a_token_of_raw_bytes_is_401_naming_the_header() -> None:
    # aiohttp's client sends only UTF-8 headers, so the bytes go over a plain socket.
    errors_as_json = error_middleware(challenge="Bearer")
    app = web.Application(middlewares=[errors_as_json, auth_middleware({"a-secret": "alice"})])
    app.router.add_get("/v1/rollouts", _rollouts)
    async with TestClient(TestServer(app)) as client:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET /v1/rollouts HTTP/1.1\r\nHost: control\r\nConnection: close\r\n"
                     b"Authorization: Bearer a-\xff\xfe\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert orjson.loads(body)["error"].startswith("malformed Authorization header")
