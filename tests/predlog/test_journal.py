"""The journal: an answered prediction is on local disk before its answer leaves the router,
in one write per group of answers, and a router killed with SIGKILL loses none of them."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry

from deploy.localdeps import free_port
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, InferResponse
from services.mesh.infra.db import create_pool, migrate
from services.predlog.log import PredictionLog
from services.predlog.spool import Spool
from services.predlog.table import PredictionTable
from tests.router.fakes import PRIMARY_ROWS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url)
    await migrate(pool)
    yield pool
    await pool.close()


def unreachable_log(root: Path) -> PredictionLog:
    """A log whose Postgres is unreachable and whose writer waits an hour: only the journal
    acts."""
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    return PredictionLog(PredictionTable(dsn, connect_timeout=1.0),
                         Spool(root, "r1", max_bytes=1 << 30), registry=CollectorRegistry(),
                         flush_interval=3600.0, flush_rows=1 << 30)


def served(request_id: str) -> tuple[InferRequest, InferResponse]:
    tensor = Tensor.from_array("x", PRIMARY_ROWS)
    return (InferRequest(model="m", inputs=[tensor], request_id=request_id),
            InferResponse("m", "1", request_id, [tensor]))


def journaled_ids(directory: Path) -> list[str]:
    """The request ids of the rows in the instance's spool files, in file order."""
    return [orjson.loads(line)[1] for path in sorted(directory.glob("spill-*.jsonl"))
            for line in path.read_bytes().splitlines()]


def metric(log: PredictionLog, name: str) -> float:
    return log.metrics.registry.get_sample_value(name) or 0.0


async def test_a_group_is_on_disk_in_one_write_before_its_answers_are_released(
    tmp_path: Path,
) -> None:
    log = unreachable_log(tmp_path)
    await log.start()
    try:
        for wave in range(2):
            ids = [f"w{wave}-{i:04}" for i in range(1000)]
            pending = [log.record(*served(i), received=time.time(), latency=0.001,
                                  policy="digest") for i in ids]
            assert all(p is not None for p in pending)
            await asyncio.gather(*(p for p in pending if p is not None))
            # Read the file as soon as the answers are released: nothing else wrote it since.
            on_disk = await asyncio.to_thread(journaled_ids, log.spool_directory)
            assert on_disk[-1000:] == ids
            assert metric(log, "infermesh_prediction_log_journal_writes_total") == wave + 1
        assert metric(log, "infermesh_prediction_log_journaled_total") == 2000
    finally:
        await log.aclose()


async def test_a_cancelled_answer_does_not_cancel_its_group(tmp_path: Path) -> None:
    log = unreachable_log(tmp_path)
    await log.start()
    try:
        first, second = (log.record(*served(i), received=time.time(), latency=0.001,
                                    policy="none") for i in ("a", "b"))
        assert first is not None and second is not None
        waiting = asyncio.ensure_future(first)
        waiting.cancel()  # its client went away
        await second
        assert await asyncio.to_thread(journaled_ids, log.spool_directory) == ["a", "b"]
    finally:
        await log.aclose()


@pytest.mark.timeout(180)
async def test_a_killed_router_loses_no_prediction_it_answered(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    count = 400
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.predlog.killed_router", database_url, str(tmp_path),
        "router-k", str(count), cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(90):  # generous: it only bounds a failure
            line = await child.stdout.readline()
        assert line == b"committed\n", f"the child router said {line!r} (exit {child.returncode})"
        assert await db.fetchval("SELECT count(*) FROM predictions") == count // 2
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()

    restarted = PredictionLog(PredictionTable(database_url),
                              Spool(tmp_path, "router-k", max_bytes=1 << 30),
                              registry=CollectorRegistry())
    await restarted.start()
    await restarted.flush()
    await restarted.aclose()
    stored = await db.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT request_id) AS ids FROM predictions"
    )
    assert stored is not None
    assert (stored["n"], stored["ids"]) == (count, count)
    assert metric(restarted, "infermesh_prediction_log_spool_bytes") == 0
