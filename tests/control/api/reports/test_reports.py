"""`GET /v1/models/{model}/report`: the prediction log joined with feedback in a real Postgres,
per version and bucket band, through the control API's app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control.api.app import create_app
from control.api.reports.store import ReportStore, band_range
from tests.control.api.conftest import ControlHarness
from tests.control.predictions import feedback, predict

Client = TestClient[web.Request, web.Application]
ADMIN = {"Authorization": "Bearer alice-secret"}
REPORT = "/v1/models/iris/report"


@pytest.fixture
async def client(control: ControlHarness) -> AsyncIterator[Client]:
    app = create_app(control.store, {"alice-secret": "alice"}, tenants=control.tenants,
                     reports=ReportStore(control.registry.pool))
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest.fixture
def pool(control: ControlHarness) -> asyncpg.Pool:
    return control.registry.pool


async def report(client: Client, query: str = "") -> dict[str, Any]:
    response = await client.get(f"{REPORT}{query}", headers=ADMIN)
    body: dict[str, Any] = await response.json()
    assert response.status == 200, body
    return body


def _rows(body: dict[str, Any]) -> dict[tuple[str, Any, bool], dict[str, Any]]:
    return {
        (row["version"], None if row["bucket_range"] is None else tuple(row["bucket_range"]),
         row["shadow"]): row
        for row in body["rows"]
    }


async def test_counts_accuracy_mean_score_and_latency_per_version_and_band(
    client: Client, pool: asyncpg.Pool
) -> None:
    for n, (latency, label) in enumerate([(10, "cat"), (20, "cat"), (30, "dog"), (40, "dog")]):
        await predict(pool, f"r{n}", bucket=100 * n, latency_ms=latency, label=label)
    await feedback(pool, "r0", label="cat")  # right
    await feedback(pool, "r1", label="dog")  # wrong
    await feedback(pool, "r2", label="dog")  # right
    await feedback(pool, "r0", score=1.0)
    await feedback(pool, "r3", score=0.5)
    await predict(pool, "r4", version="2", bucket=5123, latency_ms=7)
    await predict(pool, "r5", bucket=None, latency_ms=3)  # pinned to version 1

    body = await report(client)

    assert (body["model"], body["since"], body["buckets"], body["include_shadow"]) == (
        "iris", "24h", 10, False)
    assert [(r["version"], r["bucket_range"]) for r in body["rows"]] == [
        ("1", [0, 999]), ("1", None), ("2", [5000, 5999])]
    banded = body["rows"][0]
    assert banded == {
        "version": "1", "bucket_range": [0, 999], "shadow": False, "predictions": 4,
        "with_feedback": 4, "with_label_feedback": 3, "accuracy": pytest.approx(2 / 3),
        "with_score_feedback": 2, "mean_score": pytest.approx(0.75),
        "latency_ms": {"p50": pytest.approx(25), "p90": pytest.approx(37),
                       "p99": pytest.approx(39.7)},
    }
    pinned, other = body["rows"][1], body["rows"][2]
    assert (pinned["predictions"], pinned["latency_ms"]["p99"]) == (1, 3)
    assert (other["predictions"], other["with_feedback"]) == (1, 0)
    assert other["accuracy"] is None and other["mean_score"] is None


async def test_bands_follow_the_buckets_parameter(client: Client, pool: asyncpg.Pool) -> None:
    for bucket in (0, 3333, 3334, 6666, 6667, 9999):
        await predict(pool, f"b{bucket}", bucket=bucket)

    rows = _rows(await report(client, "?buckets=3"))
    assert {key: row["predictions"] for key, row in rows.items()} == {
        ("1", (0, 3333), False): 2, ("1", (3334, 6666), False): 2,
        ("1", (6667, 9999), False): 2,
    }
    assert [r["bucket_range"] for r in (await report(client, "?buckets=1"))["rows"]] == [
        [0, 9999]]


@pytest.mark.parametrize("bands", [1, 3, 7, 10, 64, 100])
def test_every_bucket_lies_in_the_range_of_its_band(bands: int) -> None:
    ranges = [band_range(band, bands) for band in range(bands)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 9999
    assert all(hi + 1 == lo for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False))
    for bucket in range(0, 10_000, 7):
        lo, hi = ranges[bucket * bands // 10_000]
        assert lo <= bucket <= hi


async def test_shadow_predictions_only_with_include_shadow(
    client: Client, pool: asyncpg.Pool
) -> None:
    await predict(pool, "r1", version="1", label="cat")
    await predict(pool, "r1", version="3", label="dog", shadow=True)
    await feedback(pool, "r1", label="dog")

    assert list(_rows(await report(client))) == [("1", (0, 999), False)]
    rows = _rows(await report(client, "?include_shadow=true"))
    assert rows[("1", (0, 999), False)]["accuracy"] == 0
    shadow = rows[("3", (0, 999), True)]
    assert (shadow["with_label_feedback"], shadow["accuracy"]) == (1, 1)


async def test_feedback_joins_only_its_own_tenants_prediction(
    client: Client, pool: asyncpg.Pool
) -> None:
    await predict(pool, "r1", tenant="acme", label="cat")
    await predict(pool, "r2", tenant="globex", label="cat")
    await feedback(pool, "r1", tenant="globex", label="cat")  # same id, other tenant
    await feedback(pool, "r2", tenant="globex", label="dog")
    await feedback(pool, "r3", tenant="acme", label="cat")  # no such prediction

    [row] = (await report(client))["rows"]
    assert (row["predictions"], row["with_feedback"], row["with_label_feedback"]) == (2, 1, 1)
    assert row["accuracy"] == 0


async def test_since_leaves_older_predictions_out(client: Client, pool: asyncpg.Pool) -> None:
    await predict(pool, "recent", age=timedelta(minutes=10))
    await predict(pool, "older", age=timedelta(hours=2))
    await predict(pool, "oldest", age=timedelta(days=3))

    async def predictions(query: str) -> int:
        return sum(row["predictions"] for row in (await report(client, query))["rows"])

    assert [await predictions(q) for q in ("?since=1h", "?since=3h", "", "?since=7d")] == [
        1, 2, 2, 3]
    assert (await report(client, "?since=90m"))["since"] == "90m"


async def test_feedback_kinds_are_chosen_by_label_kind_and_score_kind(
    client: Client, pool: asyncpg.Pool
) -> None:
    await predict(pool, "r1", label="cat")
    await feedback(pool, "r1", label="dog")
    await feedback(pool, "r1", label="cat", kind="expert")
    await feedback(pool, "r1", score=4, kind="csat")

    [row] = (await report(client, "?label_kind=expert&score_kind=csat"))["rows"]
    assert (row["accuracy"], row["mean_score"], row["with_score_feedback"]) == (1, 4, 1)
    [row] = (await report(client))["rows"]
    assert (row["accuracy"], row["mean_score"], row["with_score_feedback"]) == (0, None, 0)


async def test_accuracy_is_null_when_no_predicted_label_was_logged(
    client: Client, pool: asyncpg.Pool
) -> None:
    await predict(pool, "r1", label=None)  # logging policy "none"
    await feedback(pool, "r1", label="cat")

    [row] = (await report(client))["rows"]
    assert (row["with_label_feedback"], row["accuracy"]) == (1, None)


async def test_a_model_without_predictions_has_no_rows(client: Client, pool: asyncpg.Pool) -> None:
    await predict(pool, "r1", model="other")
    assert (await report(client))["rows"] == []


@pytest.mark.parametrize(("query", "error"), [
    ("?since=yesterday", "since: must be a duration"),
    ("?since=0h", "since: must be a duration"),
    ("?since=400d", "since: must be a duration"),
    ("?since=-1h", "since: must be a duration"),
    ("?buckets=0", "buckets: must be an integer in [1, 100]"),
    ("?buckets=101", "buckets: must be an integer in [1, 100]"),
    ("?buckets=ten", "buckets: must be an integer in [1, 100]"),
    ("?include_shadow=maybe", "include_shadow: must be true or false"),
    ("?label_kind=Bad", "label_kind: must match"),
    ("?score_kind=", "score_kind: must match"),
    ("?bucket=10", "bucket: unknown parameter"),
])
async def test_a_bad_parameter_is_400_naming_it(client: Client, query: str, error: str) -> None:
    response = await client.get(f"{REPORT}{query}", headers=ADMIN)
    assert response.status == 400
    assert (await response.json())["error"].startswith(error)


async def test_an_unknown_model_is_404_and_no_token_401(client: Client) -> None:
    response = await client.get("/v1/models/nope/report", headers=ADMIN)
    assert response.status == 404
    assert (await response.json())["error"] == "model 'nope' not found"
    assert (await client.get(REPORT)).status == 401


async def test_without_a_report_store_the_route_is_503(control: ControlHarness) -> None:
    app = create_app(control.store, {"alice-secret": "alice"}, tenants=control.tenants)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get(REPORT, headers=ADMIN)).status == 503
