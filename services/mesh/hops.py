"""The next hop of the data plane as an interface, with its link implementation.

`InferTarget` is what the gateway calls (a router) and what the router calls (a batcher).
The in-process implementation is the next core itself; `LinkedInferTarget` sends the request
over a link to a live instance found in etcd. `infer_handler` serves a core on a link.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Protocol

from services.mesh import frames
from services.mesh.errors import InvalidInput
from services.mesh.links import Handler
from services.mesh.peers import LinkPool
from services.mesh.types import InferRequest, InferResponse


class InferTarget(Protocol):
    """Anything that answers an InferRequest: a router, a batcher, or a link to one."""

    async def infer(self, request: InferRequest) -> InferResponse: ...


def remaining(deadline: float | None) -> float | None:
    """Seconds left until an absolute deadline (None: no deadline)."""
    return None if deadline is None else deadline - time.time()


class LinkedInferTarget:
    """Forwards requests over links to instances of one service.

    With `affinity=True`, requests for one model go to the same instance while it lives
    (rendezvous hashing), so a batcher sees all of a model's traffic and batches it together.
    """

    def __init__(self, pool: LinkPool, *, affinity: bool = False) -> None:
        self._pool = pool
        self._affinity = affinity

    async def infer(self, request: InferRequest) -> InferResponse:
        if self._affinity:
            link = self._pool.pick_by_key(request.model)
        else:
            link = self._pool.pick()
        meta, buffers = frames.encode_request(request)
        frame = await link.call(meta, buffers, timeout=remaining(request.deadline))
        return frames.decode_response(frame.meta, frame.payload)


def infer_handler(target: InferTarget) -> Handler:
    """A link handler that serves `target.infer` for `infer` frames."""

    async def handle(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
        if meta.get("op") != "infer":
            raise InvalidInput(f"unsupported link operation {meta.get('op')!r}")
        response = await target.infer(frames.decode_request(meta, payload))
        return frames.encode_response(response)

    return handle


def rendezvous_score(key: str, instance: str) -> int:
    """Highest-random-weight hash: stable choice of an instance for a key."""
    return zlib.crc32(f"{key}\0{instance}".encode())
