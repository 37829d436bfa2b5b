"""Rows Postgres would refuse are bounded, and rows it does refuse never take their neighbours."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from services.mesh.domain.tensors import Tensor
from services.predlog.log import PredictionLog
from services.predlog.rejects import REJECTED, REJECTED_OLD, RejectedRows
from services.predlog.rows import (
    MAX_FULL_JSON_CHARS,
    MAX_KEY_CHARS,
    PredictionRecord,
    Row,
    decode_row,
    to_row,
)
from services.predlog.spool import Spool
from services.predlog.table import PredictionTable
from tests.predlog.test_log import db, make_log, metric, served

__all__ = ["db"]  # the fixture, used by name

LONG_ID = "x" * 10_000


def record(request_id: str, *, tenant: str = "t", policy: str = "digest",
           inputs: Sequence[Tensor] = ()) -> PredictionRecord:
    return PredictionRecord(time.time(), request_id, tenant, "m", "1", None, False, 1.0, None,
                            policy, inputs, [])


async def rejected_lines(log: PredictionLog) -> list[dict[str, object]]:
    path = log.spool_directory / REJECTED
    text = await asyncio.to_thread(path.read_bytes)
    return [orjson.loads(line) for line in text.splitlines()]


class RefusingTable(PredictionTable):
    """The real table, except that Postgres "refuses" any batch holding `refused_id`."""

    def __init__(self, dsn: str, refused_id: str) -> None:
        super().__init__(dsn)
        self.refused_id = refused_id

    async def write(self, rows: Sequence[Row]) -> int:
        if any(row[1] == self.refused_id for row in rows):
            raise asyncpg.exceptions.DataError("invalid input syntax for type json")
        return await super().write(rows)


def test_text_fields_are_cut_to_what_the_indexes_take() -> None:
    row = to_row(record(LONG_ID, tenant="é" * 1000))
    request_id, tenant = row[1], row[2]
    assert len(request_id) == len(tenant) == MAX_KEY_CHARS
    assert request_id.startswith("x" * 200) and request_id[-17] == "#"
    assert to_row(record(LONG_ID + "y"))[1] != request_id  # distinct ids stay distinct
    assert to_row(record("x" * MAX_KEY_CHARS))[1] == "x" * MAX_KEY_CHARS  # at the limit: kept


def test_full_inputs_past_the_cap_are_kept_as_their_digest() -> None:
    big = Tensor.from_array("x", np.arange(MAX_FULL_JSON_CHARS // 4, dtype=np.int64))
    small = Tensor.from_array("x", np.arange(4, dtype=np.int64))
    assert isinstance(orjson.loads(to_row(record("r", policy="full", inputs=[small]))[10] or ""),
                      list)
    stored = orjson.loads(to_row(record("r", policy="full", inputs=[big]))[10] or "")
    assert stored == {"x": stored["x"]} and stored["x"].startswith("sha256:")


async def test_a_huge_request_id_does_not_take_its_neighbours(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    log = make_log(database_url, tmp_path)
    await log.start()
    for i in range(60):
        log.record(*served(f"r{i:02}"), received=time.time(), latency=0.001, policy="full")
    log.record(*served(LONG_ID), received=time.time(), latency=0.001, policy="full")
    await log.flush()
    await log.aclose()

    stored = [r["request_id"] for r in await db.fetch("SELECT request_id FROM predictions")]
    assert sorted(stored)[:60] == [f"r{i:02}" for i in range(60)]
    assert len(stored) == 61 and len(sorted(stored)[60]) == MAX_KEY_CHARS
    assert metric(log, "infermesh_prediction_log_written_total") == 61
    assert metric(log, "infermesh_prediction_log_rows_rejected_total") == 0


async def test_a_row_postgres_refuses_is_set_aside_alone(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    log = PredictionLog(RefusingTable(database_url, "bad"),
                        Spool(tmp_path, "r1", max_bytes=1 << 30), registry=CollectorRegistry())
    await log.start()
    for i in range(30):
        log.record(*served(f"r{i:02}"), received=time.time(), latency=0.001, policy="digest")
    log.record(*served("bad"), received=time.time(), latency=0.001, policy="digest")
    for i in range(30, 60):
        log.record(*served(f"r{i:02}"), received=time.time(), latency=0.001, policy="digest")
    await log.flush()
    await log.aclose()

    assert await db.fetchval("SELECT count(*) FROM predictions") == 60
    assert await db.fetchval("SELECT count(*) FROM predictions WHERE request_id = 'bad'") == 0
    assert metric(log, "infermesh_prediction_log_written_total") == 60
    assert metric(log, "infermesh_prediction_log_rows_rejected_total") == 1
    assert metric(log, "infermesh_prediction_log_dropped_total", reason="rejected") == 0
    (line,) = await rejected_lines(log)
    assert "DataError" in str(line["error"])
    assert decode_row(orjson.dumps(line["row"]))[1] == "bad"


async def test_a_spilled_row_postgres_refuses_is_set_aside_at_replay(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    good = [to_row(record(f"r{i:02}")) for i in range(40)]
    broken = (*good[0][:1], "broken", *good[0][2:10], "{not json", None)
    spool = Spool(tmp_path, "earlier", max_bytes=1 << 20)  # e.g. spilled by an older router
    await spool.open()
    # An older router's row has 12 columns (no features, no cache): the replay pads it.
    assert await spool.append([*good[:20], broken, *good[20:]]) == 41  # type: ignore[list-item]
    await spool.close()

    log = make_log(database_url, tmp_path)
    await log.start()
    await log.flush()
    await log.aclose()
    assert await db.fetchval("SELECT count(*) FROM predictions") == 40
    assert metric(log, "infermesh_prediction_log_replayed_total") == 40
    assert metric(log, "infermesh_prediction_log_rows_rejected_total") == 1
    (line,) = await rejected_lines(log)
    assert "json" in str(line["error"]) and line["row"][1] == "broken"  # type: ignore[index]


@pytest.mark.parametrize("rounds", [1, 50])
async def test_the_rejected_file_is_bounded(tmp_path: Path, rounds: int) -> None:
    rejects = RejectedRows(tmp_path, max_bytes=64 << 10)
    row = to_row(record("r" * MAX_KEY_CHARS))
    for _ in range(rounds):
        assert await rejects.append([(row, "DataError: no")] * 20) == 20
    sizes = [(tmp_path / name).stat().st_size for name in (REJECTED, REJECTED_OLD)
             if (tmp_path / name).exists()]
    assert 0 < sum(sizes) <= 64 << 10
