"""Links are an internal surface: refused at the upgrade without the mesh credential, and a
message over the frame limit closes its own link only."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.mesh.domain.errors import LinkClosed
from services.mesh.infra.credentials import MeshCredential
from services.mesh.transport import frames
from services.mesh.transport.links import LinkClient, LinkServer
from tests.credentials import CREDENTIAL

LIMIT = 64 * 1024
"""A small frame limit, so a refused message is cheap to send."""


class Callee:
    """A link server that counts the frames that reached its handler."""

    def __init__(self) -> None:
        self.calls = 0
        self.server = LinkServer(self.handle, name="callee", credential=CREDENTIAL,
                                 max_frame_bytes=LIMIT)

    async def handle(self, meta: dict[str, Any], payload: memoryview) -> tuple[
        dict[str, Any], frames.Buffers
    ]:
        self.calls += 1
        return {"size": len(payload)}, []


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[Callee, str]]:
    callee = Callee()
    app = web.Application()
    app.router.add_get("/link", callee.server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield callee, f"ws://127.0.0.1:{runner.addresses[0][1]}/link"
    finally:
        await callee.server.aclose()
        await runner.cleanup()


def impostor(token: str) -> MeshCredential:
    return MeshCredential(Path("(impostor)"), (token,), (0, 0))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic in-process-test-token"}])
async def test_an_upgrade_without_the_credential_is_refused_with_401(
    headers: dict[str, str],
) -> None:
    async with serving() as (callee, url), aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers=headers)
        assert refused.value.status == 401
        # A raw GET with upgrade headers: the answer names the header, no frame is read.
        async with session.get(url, headers={**headers, "Connection": "Upgrade",
                                             "Upgrade": "websocket"}) as response:
            assert response.status == 401
            assert "Authorization: Bearer" in await response.text()
    assert callee.calls == 0


async def test_a_link_client_with_a_wrong_token_cannot_connect() -> None:
    async with serving() as (callee, url), aiohttp.ClientSession() as session:
        client = LinkClient(session, url, peer="callee", credential=impostor("wrong"))
        with pytest.raises(LinkClosed, match="401"):
            await client.connect()
    assert callee.calls == 0


async def test_the_right_token_links_and_calls() -> None:
    async with serving() as (callee, url), aiohttp.ClientSession() as session:
        client = LinkClient(session, url, peer="callee", credential=CREDENTIAL,
                            max_frame_bytes=LIMIT)
        await client.connect()
        try:
            reply = await client.call({}, [b"x" * 100], timeout=30)
        finally:
            await client.aclose()
    assert reply.meta == {"size": 100}
    assert callee.calls == 1


async def test_an_oversize_message_closes_only_its_own_link() -> None:
    async with serving() as (callee, url), aiohttp.ClientSession() as session:
        # A peer with a larger limit (our own client refuses to send past its own; this one
        # is misconfigured or not ours): the receiver's limit is what holds.
        big = LinkClient(session, url, peer="callee", credential=CREDENTIAL,
                         max_frame_bytes=4 * LIMIT)
        other = LinkClient(session, url, peer="callee", credential=CREDENTIAL,
                           max_frame_bytes=LIMIT)
        await big.connect()
        await other.connect()
        try:
            with pytest.raises(LinkClosed):
                await big.call({}, [b"x" * (LIMIT + 1)], timeout=30)
            assert big.closed
            reply = await other.call({}, [b"x" * 100], timeout=30)
            assert reply.meta == {"size": 100}
        finally:
            await big.aclose()
            await other.aclose()
    assert callee.calls == 1
