"""`infermesh report MODEL` against the real control API app on a real port, over a real
Postgres holding prediction log and feedback rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from cli.main import main
from control.api.app import create_app
from control.api.core import RolloutStore
from control.api.reports.store import ReportStore
from control.api.tenants.store import TenantStore
from tests.control.predictions import feedback, predict
from tests.registry.harness import SIGNATURE, chunks_of, open_registry

TOKEN = "s3cret"


@pytest.fixture
async def control(
    database_url: str, etcd_url: str, etcd_prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """The control API (model iris registered) on a real port: (its URL, the pool)."""
    async with open_registry(database_url, etcd_url, etcd_prefix, tmp_path / "artifacts") as h:
        info = await h.registry.put_artifact(chunks_of(b"torchscript bytes"))
        for version in ("1", "2"):
            await h.registry.register_version("iris", version, artifact_sha256=info.sha256,
                                              signature=SIGNATURE)
        app = create_app(
            RolloutStore(h.pool, h.etcd, etcd_prefix=etcd_prefix), {TOKEN: "ops"},
            tenants=TenantStore(h.pool, h.etcd, etcd_prefix=etcd_prefix),
            reports=ReportStore(h.pool),
        )
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        monkeypatch.setenv("INFERMESH_CONTROL_URL", url)
        monkeypatch.setenv("INFERMESH_CONTROL_TOKEN", TOKEN)
        try:
            yield url, h.pool
        finally:
            await runner.cleanup()


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def _log_traffic(pool: asyncpg.Pool) -> None:
    """Version 1: four predictions in band 0 (two labelled, one right; one scored), one
    pinned; version 2: one in band 5 and its shadow mirror."""
    for n, latency in enumerate((10, 20, 30, 40)):
        await predict(pool, f"r{n}", bucket=10 * n, latency_ms=latency)
    await feedback(pool, "r0", label="cat")
    await feedback(pool, "r1", label="dog")
    await feedback(pool, "r1", score=0.75)
    await predict(pool, "pinned", bucket=None, latency_ms=5)
    await predict(pool, "r9", version="2", bucket=5500, latency_ms=8, age=timedelta(hours=2))
    await predict(pool, "r9", version="1", bucket=5500, shadow=True, latency_ms=9)


async def test_report_prints_a_table_per_version_and_band(
    control: tuple[str, asyncpg.Pool], capsys: pytest.CaptureFixture[str]
) -> None:
    await _log_traffic(control[1])

    assert await cli("report", "iris") == 0

    assert capsys.readouterr().out.splitlines() == [
        "report iris: last 24h, 10 bucket bands",
        "VERSION  BUCKETS    PREDICTIONS  FEEDBACK  ACCURACY  MEAN SCORE  P50 ms  P99 ms",
        "1        0-999      4            2         50.0%     0.750       25.0    39.7",
        "1        pinned     1            0         -         -           5.0     5.0",
        "2        5000-5999  1            0         -         -           8.0     8.0",
    ]


async def test_report_options_reach_the_api(
    control: tuple[str, asyncpg.Pool], capsys: pytest.CaptureFixture[str]
) -> None:
    await _log_traffic(control[1])

    code = await cli("report", "iris", "--since", "1h", "--buckets", "2", "--include-shadow")
    assert code == 0

    assert capsys.readouterr().out.splitlines() == [
        "report iris: last 1h, 2 bucket bands, shadow included",
        "VERSION     BUCKETS    PREDICTIONS  FEEDBACK  ACCURACY  MEAN SCORE  P50 ms  P99 ms",
        "1           0-4999     4            2         50.0%     0.750       25.0    39.7",
        "1           pinned     1            0         -         -           5.0     5.0",
        "1 (shadow)  5000-9999  1            0         -         -           9.0     9.0",
    ]


async def test_report_json_is_the_apis(
    control: tuple[str, asyncpg.Pool], capsys: pytest.CaptureFixture[str]
) -> None:
    url, pool = control
    await _log_traffic(pool)

    assert await cli("report", "iris", "--json", "--buckets", "5") == 0

    printed = orjson.loads(capsys.readouterr().out)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models/iris/report?buckets=5",
                               headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            expected: dict[str, Any] = await response.json()
    assert printed == expected and printed["buckets"] == 5
    assert [row["bucket_range"] for row in printed["rows"]] == [[0, 1999], None, [4000, 5999]]


async def test_a_model_without_predictions_says_so(
    control: tuple[str, asyncpg.Pool], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("report", "iris", "--since", "7d") == 0
    assert capsys.readouterr().out.splitlines() == [
        "report iris: last 7d, 10 bucket bands", "no predictions of iris in the last 7d"]


async def test_an_unknown_model_fails_with_the_apis_message(
    control: tuple[str, asyncpg.Pool], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("report", "nope") == 1
    assert capsys.readouterr().err == "infermesh: error: 404 Not Found: model 'nope' not found\n"


@pytest.mark.parametrize(("argv", "named"), [
    (["--since", "yesterday"], "argument --since: 'yesterday' is not a duration"),
    (["--buckets", "0"], "argument --buckets: '0' is not an integer in [1, 100]"),
    (["--buckets", "101"], "argument --buckets: '101' is not an integer in [1, 100]"),
])
async def test_usage_errors_exit_2_naming_the_argument(
    control: tuple[str, asyncpg.Pool], capsys: pytest.CaptureFixture[str],
    argv: list[str], named: str,
) -> None:
    assert await cli("report", "iris", *argv) == 2
    assert named in capsys.readouterr().err
