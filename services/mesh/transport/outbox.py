"""The write side of one link: frames queued in the same loop iteration leave together.

A busy link then costs one write per iteration rather than one per request. The frames go back
to back in WebSocket messages of at most `coalesce_bytes` (`frames.split_messages`): more
messages when they pass it, a frame larger than that alone in its own, never a frame cut. The
limit keeps many large frames coalesced together from passing the peer's `max_frame_bytes`,
which would close a healthy link under every call on it. 1 MiB is no slower than larger
messages: 64 concurrent 256 KiB calls over a loopback link took the same time or less with
256 KiB to 4 MiB messages than with one 16 MiB message (likely: the receiver unpacks one while
the next arrives), and the common case, a flush under the limit, costs one length comparison.

One frame alone larger than `max_frame_bytes` would close the link just the same. The gateway
bounds request bodies and the registry refuses a batch size whose batches cannot fit
(`trust.check_frame_fit`), but a variable-sized tensor (BYTES, a dynamic dimension) can still
make one: the outbox hands such a frame to `refuse` instead, which fails only its own call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import cast

import aiohttp
from aiohttp import web

from services.mesh.transport import frames

log = logging.getLogger(__name__)

DEFAULT_COALESCE_BYTES = 1 << 20
"""The default of `coalesce_bytes`: the largest message frames are coalesced into."""

Refuse = Callable[[int, int, int], None]
"""Called with (kind, call id, bytes) for a frame too large for the peer, instead of sending it."""


def coalesce_limit(coalesce_bytes: int, max_frame_bytes: int) -> int:
    """The outbox's message limit: `coalesce_bytes`, never past what the peer accepts."""
    if type(coalesce_bytes) is not int or coalesce_bytes < 1:
        raise ValueError(f"coalesce_bytes: must be a positive integer, not {coalesce_bytes!r}")
    return min(coalesce_bytes, max_frame_bytes)


class Outbox:
    """Coalesces the frames of one loop iteration into messages of at most `limit` bytes."""

    def __init__(
        self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, *, limit: int,
        max_frame_bytes: int, refuse: Refuse,
    ) -> None:
        self._ws = ws
        self._limit = limit
        self._max_frame_bytes = max_frame_bytes
        self._refuse = refuse
        self._parts: list[bytes | memoryview] = []
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="link-outbox")

    def send(self, parts: Sequence[bytes | memoryview]) -> None:
        self._parts.extend(parts)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            parts, self._parts = self._parts, []
            try:
                for message in frames.split_messages(b"".join(parts), self._limit):
                    if len(message) > self._max_frame_bytes:  # one frame alone
                        kind, _, _, call_id, _, _ = frames.HEADER.unpack_from(message)
                        self._refuse(kind, call_id, len(message))
                        continue
                    # aiohttp sends any bytes-like object; its annotation says bytes.
                    await self._ws.send_bytes(cast(bytes, message))
            except (ConnectionError, RuntimeError) as exc:
                log.debug("link write failed: %r", exc)
                await self._ws.close()
                return

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
