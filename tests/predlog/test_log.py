"""The prediction log against a real Postgres: rows per policy, partitions, spill and replay."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from deploy.localdeps import LocalPostgres, free_port
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import Unavailable
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, InferResponse
from services.mesh.infra.db import create_pool, migrate
from services.predlog.log import PredictionLog
from services.predlog.rows import EPOCH, PredictionRecord, to_row
from services.predlog.spool import Spool
from services.predlog.table import PredictionTable
from services.router.core import Router
from tests.predlog.pgproxy import Gate
from tests.router.fakes import FakeBatcher, make_config, request, rollout

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
SCORES = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
FEATURES = np.arange(6, dtype=np.float32).reshape(3, 2)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh, migrated database (jsonb decoded to Python objects)."""
    pool = await create_pool(database_url)
    await migrate(pool)
    yield pool
    await pool.close()


def make_log(dsn: str, root: Path, *, instance: str = "r1", spill_max_bytes: int = 1 << 30,
             **options: Any) -> PredictionLog:
    return PredictionLog(
        PredictionTable(dsn, connect_timeout=2.0),
        Spool(root, instance, max_bytes=spill_max_bytes),
        registry=CollectorRegistry(), probe_interval=0.1, **options,
    )


def closed_dsn() -> str:
    """A DSN nothing listens on."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


def metric(log: PredictionLog, name: str, **labels: str) -> float:
    value = log.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else float(value)


def served(request_id: str) -> tuple[InferRequest, InferResponse]:
    """A request of tenant acme with a trace, and its answer by version 1 in bucket 42."""
    req = InferRequest(model="m", inputs=[Tensor.from_array("x", FEATURES)],
                       request_id=request_id, tenant="acme", trace={"traceparent": TRACEPARENT})
    response = InferResponse("m", "1", request_id, [Tensor.from_array("y", SCORES)],
                             parameters={"bucket": 42})
    return req, response


async def spill_files(directory: Path) -> list[str]:
    return await asyncio.to_thread(lambda: sorted(p.name for p in directory.glob("spill-*")))


async def rows(db: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM predictions ORDER BY request_id, shadow"))


async def test_rows_follow_each_versions_policy(db: asyncpg.Pool, database_url: str,
                                                tmp_path: Path) -> None:
    log = make_log(database_url, tmp_path)
    await log.start()
    for request_id, policy in (("a-full", "full"), ("b-digest", "digest"), ("c-none", "none")):
        log.record(*served(request_id), received=1_700_000_000.123456, latency=0.0125,
                   policy=policy)
    await log.flush()
    await log.aclose()

    full, digest, none = await rows(db)
    assert (full["tenant"], full["model"], full["version"]) == ("acme", "m", "1")
    assert full["bucket"] == 42
    assert full["ts"] == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert full["latency_ms"] == pytest.approx(12.5) and full["trace_id"] == TRACE
    assert full["shadow"] is False and full["label"] == "1,0,1"
    assert full["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [3, 2],
                               "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}]
    assert full["outputs"][0]["data"] == pytest.approx(SCORES.reshape(-1).tolist())
    sha = hashlib.sha256(FEATURES.tobytes()).hexdigest()
    assert digest["inputs"] == {"x": f"sha256:{sha}"} and digest["label"] == "1,0,1"
    assert digest["outputs"] == {"y": "sha256:" + hashlib.sha256(SCORES.tobytes()).hexdigest()}
    assert (none["inputs"], none["outputs"], none["label"]) == (None, None, None)
    assert metric(log, "infermesh_prediction_log_written_total") == 3


@pytest.mark.parametrize(("outputs", "label"), [
    (np.array([[0.1, 0.9]], dtype=np.float32), "1"),
    (np.array([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1]], dtype=np.float64), "1,0"),
    (np.array([3, 1], dtype=np.int64), "3,1"),
    (np.array([[0.25]], dtype=np.float32), "0.25"),
    (np.array([[2, 5]], dtype=np.int32), None),  # ints with several columns: not a class score
    (np.zeros((1, 2, 2), dtype=np.float32), None),
    (np.array([b"cat", b"dog"], dtype=object), "cat,dog"),
])
def test_label_is_the_predicted_class_or_value_per_row(outputs: np.ndarray,
                                                        label: str | None) -> None:
    record = PredictionRecord(
        0.0, "r", "t", "m", "1", None, False, 1.0, None, "digest", [],
        [Tensor.from_array("y", outputs)],
    )
    assert to_row(record)[9] == label


@pytest.mark.parametrize("traceparent", [None, "", "00-abc-def-01", f"00-{'0' * 32}-{'1' * 16}-01"])
def test_a_missing_or_malformed_traceparent_has_no_trace_id(traceparent: str | None) -> None:
    record = PredictionRecord(0.0, "r", "t", "m", "1", None, False, 1.0, traceparent, "none",
                              [], [])
    assert to_row(record)[8] is None


async def test_partitions_are_created_for_each_day(db: asyncpg.Pool, database_url: str,
                                                   tmp_path: Path) -> None:
    log = make_log(database_url, tmp_path)
    await log.start()
    day_one = datetime(2024, 1, 1, 23, 59, 59, 999999, tzinfo=UTC).timestamp()
    day_two = datetime(2024, 1, 2, 0, 0, 0, tzinfo=UTC).timestamp()
    for i, ts in enumerate((day_one, day_two, day_two)):
        log.record(*served(f"r{i}"), received=ts, latency=0.001, policy="digest")
    await log.flush()
    await log.aclose()
    counts = await db.fetch(
        "SELECT tableoid::regclass::text AS part, count(*) FROM predictions GROUP BY 1 ORDER BY 1"
    )
    assert [(c["part"], c["count"]) for c in counts] == [
        ("predictions_20240101", 1), ("predictions_20240102", 2)
    ]


async def test_a_replayed_batch_is_not_written_twice(db: asyncpg.Pool, database_url: str,
                                                     tmp_path: Path) -> None:
    records = [PredictionRecord(time.time(), f"r{i}", "t", "m", "1", 7, False, 1.0, None,
                                "digest", [], []) for i in range(10)]
    batch = [to_row(r) for r in records]
    table = PredictionTable(database_url)
    await table.connect()
    assert await table.write(batch) == 10
    assert await table.write(batch) == 0
    await table.close()
    spool = Spool(tmp_path, "earlier", max_bytes=1 << 20)  # a spill of the same rows, left over
    await spool.open()
    assert await spool.append(batch) == 10
    await spool.close()

    log = make_log(database_url, tmp_path)
    await log.start()
    await log.flush()
    await log.aclose()
    assert await db.fetchval("SELECT count(*) FROM predictions") == 10
    assert metric(log, "infermesh_prediction_log_replayed_total") == 10
    assert metric(log, "infermesh_prediction_log_written_total") == 0
    assert metric(log, "infermesh_prediction_log_spool_bytes") == 0


async def test_a_full_buffer_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    log = make_log(closed_dsn(), tmp_path, max_buffered=100, flush_interval=60.0,
                   flush_rows=1000)
    await log.start()
    started = time.perf_counter()
    for i in range(150):
        log.record(*served(f"r{i}"), received=time.time(), latency=0.001, policy="full")
    assert time.perf_counter() - started < 0.5
    assert metric(log, "infermesh_prediction_log_buffered") == 100
    assert metric(log, "infermesh_prediction_log_dropped_total", reason="buffer_full") == 50
    await log.aclose()
    assert metric(log, "infermesh_prediction_log_spilled_total") == 100


async def test_rows_spill_while_unreachable_and_replay_once_reachable(
    db: asyncpg.Pool, database_url: str, local_postgres: LocalPostgres, tmp_path: Path
) -> None:
    gate = Gate(local_postgres.port)
    log = make_log(database_url.replace(f":{local_postgres.port}/", f":{gate.port}/"), tmp_path)
    await log.start()
    sent = [time.time() - i * 0.001 for i in range(50)]
    for i, ts in enumerate(sent):
        log.record(*served(f"r{i:02}"), received=ts, latency=0.002, policy="digest")
    await log.flush()
    assert metric(log, "infermesh_prediction_log_spilled_total") == 50
    assert metric(log, "infermesh_prediction_log_spool_bytes") > 0
    assert await spill_files(log.spool_directory)
    assert await db.fetchval("SELECT count(*) FROM predictions") == 0

    await gate.open()
    try:
        await log.flush()
        stored = await rows(db)
        assert [r["request_id"] for r in stored] == [f"r{i:02}" for i in range(50)]
        # The ts (part of the key) survives the spool to the microsecond.
        assert [r["ts"] for r in stored] == [
            datetime.fromtimestamp(round(ts * 1e6) / 1e6, UTC) for ts in sent
        ]
        assert metric(log, "infermesh_prediction_log_replayed_total") == 50
        assert metric(log, "infermesh_prediction_log_spool_bytes") == 0
        assert await spill_files(log.spool_directory) == []
    finally:
        await log.aclose()
        await gate.close()


async def test_a_full_spool_drops_and_counts(tmp_path: Path) -> None:
    log = make_log(closed_dsn(), tmp_path, spill_max_bytes=4096)
    await log.start()
    for i in range(100):
        log.record(*served(f"r{i}"), received=time.time(), latency=0.001, policy="digest")
    await log.flush()
    await log.aclose()
    spilled = metric(log, "infermesh_prediction_log_spilled_total")
    assert 0 < spilled < 100
    assert metric(log, "infermesh_prediction_log_dropped_total", reason="spill_full") == (
        100 - spilled
    )
    assert 0 < metric(log, "infermesh_prediction_log_spool_bytes") <= 4096


async def test_a_spool_left_by_an_earlier_instance_is_replayed_at_start(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    earlier = make_log(closed_dsn(), tmp_path, instance="host-111", flush_interval=60.0)
    await earlier.start()
    for i in range(30):
        earlier.record(*served(f"r{i}"), received=time.time(), latency=0.001, policy="full")
    await earlier.aclose()  # Postgres unreachable: aclose spills what is buffered
    assert metric(earlier, "infermesh_prediction_log_spilled_total") == 30

    later = make_log(database_url, tmp_path, instance="host-222")
    await later.start()
    await later.flush()
    await later.aclose()
    assert await db.fetchval("SELECT count(DISTINCT request_id) FROM predictions") == 30
    assert metric(later, "infermesh_prediction_log_replayed_total") == 30
    assert await asyncio.to_thread(lambda: [p.name for p in tmp_path.iterdir()]) == ["host-222"]


async def test_a_running_instance_keeps_its_spool(tmp_path: Path) -> None:
    running = make_log(closed_dsn(), tmp_path, instance="alive")
    await running.start()
    running.record(*served("r"), received=time.time(), latency=0.001, policy="none")
    await running.flush()
    other = make_log(closed_dsn(), tmp_path, instance="other")
    await other.start()
    assert await spill_files(running.spool_directory)
    assert metric(other, "infermesh_prediction_log_spool_bytes") == 0
    await other.aclose()
    await running.aclose()


async def test_aclose_writes_what_is_buffered(db: asyncpg.Pool, database_url: str,
                                              tmp_path: Path) -> None:
    log = make_log(database_url, tmp_path, flush_interval=60.0, flush_rows=1000)
    await log.start()
    for i in range(20):
        log.record(*served(f"r{i}"), received=time.time(), latency=0.001, policy="digest")
    await log.aclose()
    assert await db.fetchval("SELECT count(*) FROM predictions") == 20
    log.record(*served("late"), received=time.time(), latency=0.001, policy="digest")
    assert metric(log, "infermesh_prediction_log_dropped_total", reason="closed") == 1


async def test_the_router_logs_served_primaries_and_shadows(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    batcher = FakeBatcher()
    batcher.errors["2"] = Unavailable("no worker")
    log = make_log(database_url, tmp_path)
    await log.start()
    router = Router(ModelCatalog(make_config(rollout(1.0))), batcher, prediction_log=log)
    traced = request("traced", user="u1")
    traced.trace = {"traceparent": TRACEPARENT}
    traced.tenant = "acme"
    await router.infer(traced)
    await router.infer(request("pinned", version="1"))
    with pytest.raises(Unavailable):
        await router.infer(request("failed", version="2"))
    await router.drain(5.0)
    await log.flush()
    await router.aclose()
    await log.aclose()

    found = [(r["request_id"], r["version"], r["shadow"], r["bucket"] is not None, r["tenant"])
             for r in await rows(db)]
    assert found == [
        ("pinned", "1", False, False, "anonymous"),
        ("traced", "1", False, True, "acme"),
        ("traced", "3", True, False, "acme"),
    ]
    assert {r["trace_id"] for r in await rows(db) if r["request_id"] == "traced"} == {TRACE}
    received = (await rows(db))[1]["ts"]
    assert (datetime.now(UTC) - received).total_seconds() < 30
    assert received > EPOCH
