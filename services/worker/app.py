"""The worker's aiohttp adapter: a link endpoint for batchers, plus /metrics and /healthz."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.mesh import frames
from services.mesh.errors import InvalidInput
from services.mesh.links import Handler, LinkServer, create_link_app
from services.worker.core import Worker
from services.worker.metrics import WorkerMetrics

CORE = web.AppKey("worker", Worker)


def batch_handler(core: Worker) -> Handler:
    """Serve `batch` frames with `core.run_batch`."""

    async def handle(meta: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], Any]:
        if meta.get("op") != "batch":
            raise InvalidInput(f"unsupported link operation {meta.get('op')!r}")
        result = await core.run_batch(frames.decode_batch(meta, payload))
        return frames.encode_batch_result(result)

    return handle


def create_app(
    core: Worker, metrics: WorkerMetrics, *, drain_timeout: float = 10.0
) -> web.Application:
    """Serve `core` to batchers over links."""
    server = LinkServer(batch_handler(core), name="worker")
    app = create_link_app(server, metrics.registry, drain_timeout=drain_timeout)
    app[CORE] = core
    return app
