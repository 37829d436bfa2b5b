"""Online features through the router core: filled from a real Postgres (written through the
gateway's store), statuses per feature, defaults when missing, stale or the store is down, a
rejecting version's 400, one query per loop turn, a cache bounded by `max_age_s`, and the
statuses in the prediction log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from deploy.localdeps import free_port
from services.gateway.feature_store import PostgresFeatureWrites
from services.gateway.features import FeatureRow
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.features import FeatureSpec
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    ModelVersion,
    Rollout,
    Route,
    Signature,
    TensorSpec,
)
from services.mesh.infra.db import create_pool, migrate
from services.predlog.log import start_prediction_log
from services.predlog.rows import PredictionRecord, decode_row, encode_rows, to_row
from services.router.core import Router
from services.router.feature_store import open_feature_rows
from services.router.features import FeatureRows, FeatureValue, Key, OnlineFeatures

NOW = datetime.now(UTC)


def signature(on_missing: str = "default") -> Signature:
    feature = FeatureSpec("user", "user_id", ("age", "spend"), 3600.0, (-1.0, -2.0), on_missing)
    return Signature(
        inputs=(TensorSpec("x", "FP32", (-1, 1)), TensorSpec("f", "FP32", (-1, 2), feature)),
        outputs=(TensorSpec("y", "FP32", (-1, 1)),),
    )


class EchoBatcher:
    """Answers with the request's inputs, and keeps the requests it saw."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        assert request.version is not None
        return InferResponse(request.model, request.version, request.request_id, request.inputs)


def catalog(on_missing: str = "default") -> ModelCatalog:
    version = ModelVersion("m", "1", signature(on_missing), "file:///dev/null", "0" * 64)
    config = StaticConfig({"rollouts/m": Rollout("m", (Route("1", 100.0),)).to_json()})
    config.put("models/m/1", version.to_json())
    config.put("endpoints/worker/w1", {"models": ["m/1"]})
    return ModelCatalog(config)


def request(user: str, request_id: str = "r") -> InferRequest:
    x = Tensor.from_array("x", np.ones((1, 1), dtype=np.float32))
    return InferRequest("m", [x], request_id, tenant="acme", parameters={"user_id": user})


def filled(batcher: EchoBatcher) -> list[float]:
    return [float(v) for v in batcher.seen[-1].inputs[-1].array().reshape(-1)]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url)
    await migrate(pool)
    writes = PostgresFeatureWrites(pool)
    await writes.upsert("acme", "user", [
        FeatureRow("fresh", "age", 31, NOW), FeatureRow("fresh", "spend", 12.5, NOW),
        FeatureRow("old", "age", 40, NOW.replace(year=NOW.year - 1)),
        FeatureRow("old", "spend", 1, NOW),
    ])
    yield pool
    await pool.close()


@pytest.fixture
async def rows(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[FeatureRows]:
    async with open_feature_rows(database_url) as rows:
        yield rows


async def test_present_missing_and_stale_features(rows: FeatureRows) -> None:
    batcher = EchoBatcher()
    router = Router(catalog(), batcher, features=OnlineFeatures(rows, timeout=5.0))
    answer = await router.infer(request("fresh"))
    assert answer.parameters["features"] == {"age": "present", "spend": "present"}
    assert "degraded" not in answer.parameters and filled(batcher) == [31.0, 12.5]
    answer = await router.infer(request("nobody"))
    assert answer.parameters["features"] == {"age": "defaulted_missing",
                                             "spend": "defaulted_missing"}
    assert filled(batcher) == [-1.0, -2.0]
    answer = await router.infer(request("old"))
    assert answer.parameters["features"] == {"age": "defaulted_stale", "spend": "present"}
    assert filled(batcher) == [-1.0, 1.0]


async def test_another_tenants_rows_are_not_read(rows: FeatureRows) -> None:
    batcher = EchoBatcher()
    router = Router(catalog(), batcher, features=OnlineFeatures(rows, timeout=5.0))
    other = request("fresh")
    other.tenant = "globex"
    answer = await router.infer(other)
    assert answer.parameters["features"]["age"] == "defaulted_missing"


async def test_a_caller_sending_the_input_is_served_as_sent(rows: FeatureRows) -> None:
    batcher, features = EchoBatcher(), OnlineFeatures(rows, timeout=5.0)
    sent = request("fresh")
    sent.inputs.append(Tensor.from_array("f", np.array([[7, 8]], dtype=np.float32)))
    answer = await Router(catalog(), batcher, features=features).infer(sent)
    assert filled(batcher) == [7.0, 8.0] and "features" not in answer.parameters
    assert features.queries == 0


async def test_store_down_serves_every_default_marked_degraded() -> None:
    async with open_feature_rows(f"postgresql://u:p@127.0.0.1:{free_port()}/none") as rows:
        batcher = EchoBatcher()
        router = Router(catalog(), batcher, features=OnlineFeatures(rows, timeout=2.0))
        answer = await router.infer(request("fresh"))
    assert answer.parameters["features"] == {"age": "store_down", "spend": "store_down"}
    assert answer.parameters["degraded"] is True and filled(batcher) == [-1.0, -2.0]


async def test_on_missing_reject_names_the_feature(rows: FeatureRows) -> None:
    router = Router(catalog("reject"), EchoBatcher(), features=OnlineFeatures(rows, timeout=5.0))
    assert (await router.infer(request("fresh"))).parameters["features"]["age"] == "present"
    with pytest.raises(InvalidInput, match="feature 'age' of user 'old': stale"):
        await router.infer(request("old"))
    with pytest.raises(InvalidInput, match="parameter 'user_id'"):
        anonymous = request("fresh")
        anonymous.parameters.clear()
        await router.infer(anonymous)


class CountingRows:
    """Counts the queries made through it."""

    def __init__(self, rows: FeatureRows) -> None:
        self.rows, self.queries = rows, 0

    async def fetch(self, keys: Sequence[Key]) -> dict[Key, FeatureValue]:
        self.queries += 1
        return await self.rows.fetch(keys)


async def test_concurrent_lookups_make_one_query(rows: FeatureRows) -> None:
    counting, batcher = CountingRows(rows), EchoBatcher()
    router = Router(catalog(), batcher, features=OnlineFeatures(counting, timeout=5.0))
    users = ["fresh", "old"] + [f"u{i}" for i in range(30)]
    answers = await asyncio.gather(*(router.infer(request(u, u)) for u in users))
    assert counting.queries == 1
    assert answers[0].parameters["features"]["age"] == "present"
    assert answers[2].parameters["features"]["age"] == "defaulted_missing"
    await router.infer(request("fresh"))  # from the cache
    assert counting.queries == 1


class MemoryRows:
    def __init__(self) -> None:
        self.values: dict[Key, FeatureValue] = {}

    async def fetch(self, keys: Sequence[Key]) -> dict[Key, FeatureValue]:
        return {k: self.values[k] for k in keys if k in self.values}


async def test_the_cache_never_serves_a_value_older_than_max_age() -> None:
    store, now = MemoryRows(), [1000.0]
    for name, value in (("age", 1), ("spend", 1)):
        store.values[("acme", "user", "u", name)] = FeatureValue(value, 1000.0 - 3000.0)
    features = OnlineFeatures(store, cache_ttl=1e6, clock=lambda: now[0])
    batcher = EchoBatcher()
    router = Router(catalog(), batcher, features=features)
    assert (await router.infer(request("u"))).parameters["features"]["age"] == "present"
    store.values[("acme", "user", "u", "age")] = FeatureValue(2, 1500.0)
    now[0] = 1000.0 + 601.0  # the cached age is now 3601 s old: past max_age_s
    answer = await router.infer(request("u"))
    assert answer.parameters["features"] == {"age": "present", "spend": "defaulted_stale"}
    assert filled(batcher) == [2.0, -2.0] and features.queries == 2


async def test_statuses_land_in_the_prediction_log(
    rows: FeatureRows, database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        log = await start_prediction_log(database_url, registry=CollectorRegistry(),
                                         instance="features", spool_root=str(tmp_path))
        assert log is not None
        stack.push_async_callback(log.aclose)
        router = Router(catalog(), EchoBatcher(), prediction_log=log,
                        features=OnlineFeatures(rows, timeout=5.0))
        await router.infer(request("old", "req-old"))
        await log.flush()
    stored = await pool.fetchval("SELECT features FROM predictions WHERE request_id = 'req-old'")
    assert stored == {"age": "defaulted_stale", "spend": "present"}


def test_a_row_spilled_before_the_features_column_reads_back_without_them() -> None:
    record = PredictionRecord(0.0, "r", "t", "m", "1", None, False, 1.0, None, "none", (), (),
                              {"age": "present"})
    row = to_row(record)
    assert row[-2] == '{"age":"present"}'  # the last column is `cache` (docs/CACHE.md)
    old_line = encode_rows([row[:-2]])[0]  # type: ignore[list-item]
    assert decode_row(old_line)[-2] is None and decode_row(encode_rows([row])[0]) == row
