"""Acceptance: 1,000 predictions through the router give 1,000 rows, although the Postgres they
are logged to is stopped in the middle of the traffic and started again later."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deploy.localdeps import LocalPostgres, start_postgres
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.infra.db import create_pool, migrate
from services.predlog.log import PredictionLog
from services.predlog.spool import Spool
from services.predlog.table import PredictionTable
from services.router.core import Router
from services.router.metrics import RouterMetrics
from tests.router.fakes import FakeBatcher, make_config, request, rollout
from tests.waiting import wait_for

WAVE = 50


class PrivatePostgres:
    """A Postgres of this test's own, stopped and started again on the same port and data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server: LocalPostgres | None = None
        self.port = 0

    @property
    def dsn(self) -> str:
        assert self.server is not None, "started first"
        return self.server.dsn  # the same port and password across restarts

    async def start(self) -> None:
        self.server = await asyncio.to_thread(
            start_postgres, self.root / "data", port=self.port or None, fast=True
        )
        self.port = self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)


@pytest.fixture
async def postgres() -> AsyncIterator[PrivatePostgres]:
    # Outside pytest's basetemp, as the session's Postgres (conftest.py says why).
    root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="infermesh-test-pg-outage-"))
    await asyncio.to_thread(root.chmod, 0o755)
    private = PrivatePostgres(root)
    try:
        await private.start()
        pool = await create_pool(private.dsn)
        await migrate(pool)
        await pool.close()
        yield private
    finally:
        await private.stop()
        await asyncio.to_thread(shutil.rmtree, root, True)


async def send(router: Router, ids: list[str], *, pause: float = 0.0) -> None:
    """Requests in concurrent waves; any failed prediction fails the test."""
    for start in range(0, len(ids), WAVE):
        responses = await asyncio.gather(*(
            router.infer(request(i, user=i)) for i in ids[start:start + WAVE]
        ))
        assert [r.request_id for r in responses] == ids[start:start + WAVE]
        await asyncio.sleep(pause)  # traffic spread over the stop or start taking place


@pytest.mark.timeout(60)
async def test_a_postgres_outage_loses_no_prediction_and_no_log_row(
    postgres: PrivatePostgres, tmp_path: Path
) -> None:
    metrics = RouterMetrics()
    log = PredictionLog(
        PredictionTable(postgres.dsn, connect_timeout=1.0),
        Spool(tmp_path / "spool", "router-1", max_bytes=1 << 30),
        registry=metrics.registry, probe_interval=0.2,
    )
    await log.start()
    router = Router(ModelCatalog(make_config(rollout(0.0))), FakeBatcher(), metrics=metrics,
                    prediction_log=log)
    ids = [f"req-{i:04}" for i in range(1000)]
    try:
        await send(router, ids[:300])
        await asyncio.gather(postgres.stop(), send(router, ids[300:600], pause=0.02))
        await send(router, ids[600:800])
        await log.flush()  # Postgres is down: what was buffered is spilled now
        assert sample(metrics, "infermesh_prediction_log_spilled_total") > 0
        await asyncio.gather(postgres.start(), send(router, ids[800:], pause=0.02))
        count = await rows_once_settled(log, postgres.dsn, expected=1000)
    finally:
        await router.aclose()
        await log.aclose()

    assert count == (1000, 1000)
    assert sample(metrics, "infermesh_router_requests_total", model="m", version="1",
                  outcome="success") == 1000
    assert sample(metrics, "infermesh_prediction_log_replayed_total") > 0
    assert sample(metrics, "infermesh_prediction_log_spool_bytes") == 0
    assert sample(metrics, "infermesh_prediction_log_dropped_total", reason="buffer_full") == 0


async def rows_once_settled(log: PredictionLog, dsn: str, *,
                            expected: int) -> tuple[int, int]:
    """(rows, distinct request ids) once `expected` rows are in; fails after 30 s."""
    pool = await create_pool(dsn)

    async def counts() -> tuple[int, int]:
        await log.flush()  # probes Postgres, replays the spool, writes the buffer
        row = await pool.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT request_id) AS ids FROM predictions"
        )
        assert row is not None
        return int(row["n"]), int(row["ids"])

    try:
        return await wait_for(counts, lambda seen: seen[0] >= expected, timeout=30,
                              what=f"{expected} prediction rows in Postgres", interval=0.2)
    finally:
        await pool.close()


def sample(metrics: RouterMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value
