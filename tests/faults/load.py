"""An open-loop load of mlp REST requests, each with a unique id and a server deadline.

Requests are sent on a fixed schedule whatever happens to earlier ones (open loop: a fault
cannot slow the sender down and hide itself). Each carries the OIP parameter `timeout` (the
server deadline); the client gives up `HUNG_AFTER` seconds later and counts the request HUNG.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tests.integration.oip import infer_body, mlp_input

DEADLINE = 2.0
"""The server deadline each request carries (seconds)."""
HUNG_AFTER = DEADLINE + 1.5
"""No answer by then (seconds after sending) and the request counts as hung."""


@dataclass
class Outcome:
    """What became of one request."""

    request_id: str
    sent: float
    """`time.monotonic()` when it was sent."""
    status: int | None = None
    """HTTP status; None for a connection error or a hang."""
    latency: float | None = None
    """Seconds from send to answer (or to the connection error); None when hung."""
    error: str = ""
    """The body's `error`, or the connection error's class; empty for a 200."""
    deadline: float = DEADLINE
    """The server deadline it carried (seconds)."""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def hung(self) -> bool:
        return self.latency is None

    @property
    def kind(self) -> str:
        """`200`, another status, `connection` or `hung`."""
        if self.hung:
            return "hung"
        return "connection" if self.status is None else str(self.status)


@dataclass
class OpenLoop:
    """Sends mlp inferences to `url` at `rate` per second until `stop()`, request n with
    deadline `deadlines[n % len(deadlines)]`."""

    url: str
    headers: dict[str, str]
    rate: float = 40.0
    deadlines: tuple[float, ...] = (DEADLINE,)
    outcomes: list[Outcome] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _pacer: asyncio.Task[None] | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection limit: a pool would queue requests in the client and blur latency.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._pacer = asyncio.create_task(self._pace())

    async def stop(self) -> list[Outcome]:
        """Stop sending, wait for every request to finish or hang; all outcomes, by send time."""
        assert self._pacer is not None and self._session is not None
        self._pacer.cancel()
        await asyncio.gather(self._pacer, return_exceptions=True)
        await asyncio.gather(*self._tasks)
        await self._session.close()
        return sorted(self.outcomes, key=lambda outcome: outcome.sent)

    async def _pace(self) -> None:
        started = time.monotonic()
        body = infer_body("features", mlp_input(1, seed=7))
        template: dict[str, Any] = orjson.loads(body)
        tag = uuid.uuid4().hex[:8]
        for n in itertools.count():
            # A sleep paces the open-loop sender; it waits for nothing to happen.
            await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))
            request_id = f"fault-{tag}-{n}"
            deadline = self.deadlines[n % len(self.deadlines)]
            payload = {**template, "id": request_id, "parameters": {"timeout": deadline}}
            self._tasks.append(asyncio.create_task(self._send(request_id, payload, deadline)))

    async def _send(self, request_id: str, payload: dict[str, Any], deadline: float) -> None:
        assert self._session is not None
        outcome = Outcome(request_id, time.monotonic(), deadline=deadline)
        timeout = aiohttp.ClientTimeout(total=HUNG_AFTER)
        headers = {"Content-Type": "application/json", **self.headers}
        try:
            async with self._session.post(self.url, data=orjson.dumps(payload),
                                          headers=headers, timeout=timeout) as response:
                raw = await response.read()
                outcome.status = response.status
        except TimeoutError:
            self.outcomes.append(outcome)  # hung: no status, no latency
            return
        except aiohttp.ClientError as exc:
            outcome.latency, outcome.error = time.monotonic() - outcome.sent, type(exc).__name__
            self.outcomes.append(outcome)
            return
        outcome.latency = time.monotonic() - outcome.sent
        if outcome.status != 200:
            outcome.error = _error_text(raw)
        self.outcomes.append(outcome)


def _error_text(raw: bytes) -> str:
    """The JSON body's `error`; empty when the body is not a JSON object naming one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else ""
