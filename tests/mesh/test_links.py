from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.mesh.domain.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    LinkClosed,
    QuotaExceeded,
)
from services.mesh.transport import frames
from services.mesh.transport.links import Handler, LinkClient, LinkServer
from tests.credentials import CREDENTIAL


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[LinkServer, str]]:
    """A real link server on 127.0.0.1; yields it and its ws:// URL."""
    server = LinkServer(handler, name="test-callee", credential=CREDENTIAL)
    app = web.Application()
    app.router.add_get("/link", server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"ws://127.0.0.1:{port}/link"
    finally:
        await server.aclose()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def linked(handler: Handler) -> AsyncIterator[tuple[LinkServer, LinkClient]]:
    async with serving(handler) as (server, url), aiohttp.ClientSession() as session:
        client = LinkClient(session, url, peer="callee", credential=CREDENTIAL)
        await client.connect()
        try:
            yield server, client
        finally:
            await client.aclose()


async def echo(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], frames.Buffers]:
    return {"echo": meta}, [bytes(payload)[::-1]]


async def test_call_returns_reply_meta_and_payload() -> None:
    async with linked(echo) as (_, client):
        frame = await client.call({"op": "x", "n": 1}, [b"ab", memoryview(b"cd")])
        assert frame.kind == frames.REPLY
        assert frame.meta == {"echo": {"op": "x", "n": 1}}
        assert bytes(frame.payload) == b"dcba"
        assert client.inflight == 0


async def test_many_concurrent_calls_share_one_link() -> None:
    calls = 200
    arrived = 0
    all_arrived = asyncio.Event()

    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        nonlocal arrived
        arrived += 1
        if arrived == calls:
            all_arrived.set()
        # Every call waits for the others: only a multiplexed link can answer any of them.
        await all_arrived.wait()
        return {"i": meta["i"]}, [bytes(payload) * 2]

    async with linked(handler) as (_, client):
        async with asyncio.timeout(10):
            replies = await asyncio.gather(
                *(client.call({"i": i}, [str(i).encode()]) for i in range(calls))
            )
        assert [r.meta["i"] for r in replies] == list(range(calls))
        assert [bytes(r.payload) for r in replies] == [str(i).encode() * 2 for i in range(calls)]
        assert client.inflight == 0


async def test_infermesh_error_crosses_the_link_as_itself() -> None:
    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        if meta["kind"] == "invalid":
            raise InvalidInput("input 'x': wrong shape")
        raise QuotaExceeded("tenant acme over quota", retry_after=1.5)

    async with linked(handler) as (_, client):
        with pytest.raises(InvalidInput) as invalid:
            await client.call({"kind": "invalid"}, [])
        assert type(invalid.value) is InvalidInput
        assert invalid.value.message == "input 'x': wrong shape"

        with pytest.raises(QuotaExceeded) as quota:
            await client.call({"kind": "quota"}, [])
        assert quota.value.message == "tenant acme over quota"
        assert quota.value.retry_after == 1.5
        # The link stays usable after errors.
        assert not client.closed


async def test_unexpected_exception_arrives_as_internal_error() -> None:
    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        raise ZeroDivisionError("division by zero")

    async with linked(handler) as (_, client):
        with pytest.raises(InternalError) as caught:
            await client.call({}, [])
        assert type(caught.value) is InternalError
        assert "test-callee" in caught.value.message
        assert "ZeroDivisionError" in caught.value.message


async def test_timeout_raises_deadline_exceeded_and_cancels_the_handler() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    async with linked(handler) as (_, client):
        with pytest.raises(DeadlineExceeded, match="callee"):
            await client.call({}, [], timeout=0.05)
        assert client.inflight == 0
        async with asyncio.timeout(5):
            await cancelled.wait()
        assert started.is_set()
        # A late-expired call leaves the link healthy for the next one.
        assert not client.closed


async def test_cancelling_the_caller_cancels_the_handler() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        if meta.get("quick"):
            return {"ok": True}, []
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    async with linked(handler) as (_, client):
        call = asyncio.create_task(client.call({}, []))
        async with asyncio.timeout(5):
            await started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        async with asyncio.timeout(5):
            await cancelled.wait()
        assert (await client.call({"quick": True}, [])).meta == {"ok": True}


async def test_server_close_fails_in_flight_calls_with_link_closed() -> None:
    calls = 5
    started = 0
    all_started = asyncio.Event()

    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        nonlocal started
        started += 1
        if started == calls:
            all_started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with linked(handler) as (server, client):
        pending = [asyncio.create_task(client.call({"i": i}, [])) for i in range(calls)]
        async with asyncio.timeout(5):
            await all_started.wait()
            await server.aclose()
            results = await asyncio.gather(*pending, return_exceptions=True)
            await client.wait_closed()
        assert all(isinstance(r, LinkClosed) for r in results), results
        assert client.closed
        with pytest.raises(LinkClosed, match="closed"):
            await client.call({}, [])


async def test_client_close_fails_its_in_flight_calls() -> None:
    started = asyncio.Event()

    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with linked(handler) as (_, client):
        call = asyncio.create_task(client.call({}, []))
        async with asyncio.timeout(5):
            await started.wait()
            await client.aclose()
            with pytest.raises(LinkClosed):
                await call
        with pytest.raises(LinkClosed):
            await client.call({}, [])


async def test_calls_before_connect_raise_link_closed() -> None:
    async with aiohttp.ClientSession() as session:
        client = LinkClient(session, "ws://127.0.0.1:1/link", peer="nobody",
                            credential=CREDENTIAL)
        with pytest.raises(LinkClosed):
            await client.call({}, [])


async def test_connect_to_a_closed_port_raises_link_closed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        client = LinkClient(session, f"ws://127.0.0.1:{port}/link", peer="gone",
                            credential=CREDENTIAL)
        async with asyncio.timeout(5):
            with pytest.raises(LinkClosed, match=f"gone at ws://127.0.0.1:{port}/link"):
                await client.connect()
        assert client.closed


async def test_drain_waits_for_calls_in_progress() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        started.set()
        await release.wait()
        return {"done": True}, []

    async with linked(handler) as (server, client):
        call = asyncio.create_task(client.call({}, []))
        async with asyncio.timeout(5):
            await started.wait()
            drained = asyncio.create_task(server.drain(timeout=5))
            await asyncio.sleep(0)
            assert not drained.done()
            release.set()
            await drained
            assert (await call).meta == {"done": True}
