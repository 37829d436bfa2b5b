"""A router with a prediction log, run as a child process by `test_journal` and killed there.

    python -m tests.predlog.killed_router DSN SPOOL_ROOT INSTANCE COUNT

Serves COUNT requests through the router core (a fake batcher; its prediction log on DSN, with
a flush interval of an hour so that nothing reaches Postgres on its own), half of them before
one `flush()` (those are in Postgres), half after; prints `committed` once every answer was
returned, then waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.mesh.domain.catalog import ModelCatalog
from services.predlog.log import PredictionLog
from services.predlog.spool import Spool
from services.predlog.table import PredictionTable
from services.router.core import Router
from tests.router.fakes import FakeBatcher, make_config, request, rollout

WAVE = 50


async def serve(dsn: str, root: Path, instance: str, count: int) -> None:
    log = PredictionLog(
        PredictionTable(dsn), Spool(root, instance, max_bytes=1 << 30),
        registry=CollectorRegistry(), flush_interval=3600.0, flush_rows=1 << 30,
    )
    await log.start()
    router = Router(ModelCatalog(make_config(rollout(0.0))), FakeBatcher(), prediction_log=log)
    ids = [f"k{i:05}" for i in range(count)]
    for start in range(0, count, WAVE):
        if start == count // 2 // WAVE * WAVE:
            await log.flush()  # the first half reaches Postgres (and leaves the journal)
        answers = await asyncio.gather(*(router.infer(request(i)) for i in ids[start:start + WAVE]))
        assert [a.request_id for a in answers] == ids[start:start + WAVE]
    print("committed", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
