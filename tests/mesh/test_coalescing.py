"""Frame coalescing on a real link: the calls of one loop iteration share WebSocket messages of
at most the coalescing limit, a frame larger than the limit goes alone, and one member's failure
fails only its own call.

Messages are counted by wrapping aiohttp's `send_bytes` on both ends. Calls started together
by `gather` all queue their frames before the outbox wakes (the loop runs ready callbacks in
order), so "issued in one iteration" is exact and the counts are deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from services.mesh.domain.errors import InternalError, InvalidInput
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, InferResponse
from services.mesh.transport import frames
from services.mesh.transport.links import Handler, LinkClient, LinkServer
from services.mesh.transport.outbox import DEFAULT_COALESCE_BYTES
from tests.credentials import CREDENTIAL

Sent = dict[str, list[bytes]]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """Every WebSocket message each end sends, as bytes, in order."""
    messages: Sent = {"client": [], "server": []}

    def recording(cls: Any, end: str) -> None:
        original = cls.send_bytes

        async def send_bytes(self: Any, data: bytes, compress: int | None = None) -> None:
            messages[end].append(bytes(data))
            await original(self, data, compress)

        monkeypatch.setattr(cls, "send_bytes", send_bytes)

    recording(aiohttp.ClientWebSocketResponse, "client")
    recording(web.WebSocketResponse, "server")
    return messages


@contextlib.asynccontextmanager
async def linked(
    handler: Handler, *, coalesce_bytes: int = DEFAULT_COALESCE_BYTES,
    max_frame_bytes: int = 64 << 20,
) -> AsyncIterator[LinkClient]:
    """A real LinkServer on 127.0.0.1 and a LinkClient connected to it, both ends with the
    same limits."""
    limits = {"coalesce_bytes": coalesce_bytes, "max_frame_bytes": max_frame_bytes}
    server = LinkServer(handler, name="test-callee", credential=CREDENTIAL, **limits)
    app = web.Application()
    app.router.add_get("/link", server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"ws://127.0.0.1:{runner.addresses[0][1]}/link"
    try:
        async with aiohttp.ClientSession() as session:
            client = LinkClient(session, url, peer="callee", credential=CREDENTIAL, **limits)
            await client.connect()
            try:
                yield client
            finally:
                await client.aclose()
    finally:
        await server.aclose()
        await runner.cleanup()


async def echo(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], frames.Buffers]:
    return {"i": meta["i"]}, [bytes(payload)[::-1]]


def _frames_in(message: bytes) -> list[tuple[int, int]]:
    return [(frame.kind, frame.call_id) for frame in frames.unpack(message)]


async def _calls(client: LinkClient, payloads: list[bytes]) -> list[frames.Frame]:
    """One call per payload, all issued in one loop iteration."""
    async with asyncio.timeout(30):
        return await asyncio.gather(
            *(client.call({"i": i}, [payload]) for i, payload in enumerate(payloads))
        )


async def test_calls_of_one_iteration_share_one_message_each_way(sent: Sent) -> None:
    calls = 50
    arrived = 0
    all_arrived = asyncio.Event()

    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        nonlocal arrived
        arrived += 1
        if arrived == calls:
            all_arrived.set()
        await all_arrived.wait()  # every reply is then queued in one iteration too
        return await echo(meta, payload)

    async with linked(handler) as client:
        replies = await _calls(client, [f"row {i}".encode() for i in range(calls)])
    assert [bytes(r.payload) for r in replies] == [f"row {i}".encode()[::-1] for i in range(calls)]
    [request_message] = sent["client"]
    [reply_message] = sent["server"]
    assert len(_frames_in(request_message)) == calls
    assert len(_frames_in(reply_message)) == calls


async def test_a_frame_larger_than_the_limit_goes_alone_and_arrives_intact(sent: Sent) -> None:
    big = np.random.default_rng(7).bytes(DEFAULT_COALESCE_BYTES + (512 << 10))
    async with linked(echo) as client:
        replies = await _calls(client, [b"before", big, b"after"])
    assert [bytes(r.payload) for r in replies] == [b"erofeb", big[::-1], b"retfa"]
    # The big frame cut the iteration's frames in three, in order; only it passes the limit.
    assert [_frames_in(m) for m in sent["client"]] == [
        [(frames.CALL, 1)], [(frames.CALL, 2)], [(frames.CALL, 3)]]
    assert [len(m) > DEFAULT_COALESCE_BYTES for m in sent["client"]] == [False, True, False]


async def test_frames_past_the_limit_together_leave_in_several_messages(sent: Sent) -> None:
    limit, calls = 4096, 20
    async with linked(echo, coalesce_bytes=limit) as client:
        replies = await _calls(client, [bytes([i]) * 1000 for i in range(calls)])
    assert [bytes(r.payload) for r in replies] == [bytes([i]) * 1000 for i in range(calls)]
    messages = sent["client"]
    assert len(messages) > 1
    assert all(len(m) <= limit for m in messages)
    # Packed greedily, in call order: each message but the last had no room for the next frame.
    ids = [call_id for m in messages for _, call_id in _frames_in(m)]
    assert ids == list(range(1, calls + 1))
    frame_bytes = len(messages[0]) // len(_frames_in(messages[0]))
    assert all(len(m) + frame_bytes > limit for m in messages[:-1])


async def test_large_frames_together_stay_under_the_receivers_frame_limit() -> None:
    """The bug the limit fixes: ten 40 KiB calls coalesced into one 400 KiB message would pass
    a 64 KiB `max_frame_bytes`, and the receiver would close the link under all of them."""
    async with linked(echo, max_frame_bytes=64 << 10) as client:
        payloads = [bytes([i]) * (40 << 10) for i in range(10)]
        replies = await _calls(client, payloads)
        assert [bytes(r.payload) for r in replies] == payloads  # each payload is one byte value
        assert not client.closed


def _request(request_id: str) -> InferRequest:
    return InferRequest(model="m", inputs=[Tensor.from_array("x", np.arange(4, dtype="f4"))],
                        request_id=request_id)


async def test_a_failing_member_fails_only_its_own_call(sent: Sent) -> None:
    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        if meta.get("boom"):
            raise ZeroDivisionError("division by zero")
        request = frames.decode_request(meta, payload)  # InvalidInput for bad metadata
        return frames.encode_response(InferResponse(
            model=request.model, version="1", request_id=request.request_id,
            outputs=request.inputs))

    bad_meta, bad_buffers = frames.encode_request(_request("bad"))
    bad_meta["tensors"][0][3] = 999  # its descriptor no longer adds up to its payload
    calls = [
        frames.encode_request(_request("a")), ({"boom": True}, []),
        (bad_meta, bad_buffers), frames.encode_request(_request("b")),
    ]
    async with linked(handler) as client:
        async with asyncio.timeout(30):
            results = await asyncio.gather(
                *(client.call(meta, buffers) for meta, buffers in calls), return_exceptions=True
            )
        assert not client.closed
    assert len(sent["client"]) == 1  # all four travelled in one message
    good = [frames.decode_response(r.meta, r.payload) for r in results[::3]]  # type: ignore[union-attr]
    assert [r.request_id for r in good] == ["a", "b"]
    assert [bytes(r.outputs[0].data) for r in good] == [np.arange(4, dtype="f4").tobytes()] * 2
    assert type(results[1]) is InternalError
    assert "ZeroDivisionError" in results[1].message
    assert type(results[2]) is InvalidInput
    assert "'x'" in results[2].message


async def test_a_request_over_max_frame_bytes_fails_alone_and_is_never_sent(sent: Sent) -> None:
    async with linked(echo, max_frame_bytes=64 << 10) as client:
        async with asyncio.timeout(30):
            results = await asyncio.gather(
                *(client.call({"i": i}, [payload]) for i, payload in
                  enumerate([b"small", bytes(65 << 10), b"other"])),
                return_exceptions=True,
            )
        assert [bytes(r.payload) for r in results[::2]] == [b"llams", b"rehto"]  # type: ignore[union-attr]
        assert type(results[1]) is InvalidInput
        assert "max_frame_bytes" in results[1].message
        assert not client.closed
    assert all(len(m) <= 64 << 10 for m in sent["client"])


async def test_a_reply_over_max_frame_bytes_fails_only_its_own_call() -> None:
    async def handler(meta: dict[str, Any], payload: memoryview) -> Any:
        return {"i": meta["i"]}, [bytes(payload) * (70 << 10 if meta["i"] == 1 else 1)]

    async with linked(handler, max_frame_bytes=64 << 10) as client:
        async with asyncio.timeout(30):
            results = await asyncio.gather(
                *(client.call({"i": i}, [b"x"]) for i in range(3)), return_exceptions=True
            )
        assert [bytes(r.payload) for r in results[::2]] == [b"x", b"x"]  # type: ignore[union-attr]
        assert type(results[1]) is InternalError
        assert "max_frame_bytes" in results[1].message
        assert not client.closed
