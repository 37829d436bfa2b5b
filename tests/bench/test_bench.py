"""The benchmark's own machinery: load generators against a real local server, the report."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiohttp import web

from bench.loadgen import run_closed, run_open
from bench.report import Report, Run
from bench.result import LoadResult, Percentiles
from bench.wrk import parse_wrk


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """A tiny OIP-shaped server: 200 for mlp, 500 for anything else."""

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        if request.match_info["model"] != "mlp":
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response({"model_name": "mlp", "outputs": []})

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def test_closed_loop_counts_answers_and_latencies(server: str) -> None:
    result = await run_closed(server, "mlp", concurrency=4, duration=1.0, warmup=0.1)
    assert result.requests > 0 and result.errors == 0
    assert result.rps > 0 and 0 < result.latency.p50 <= result.latency.max


async def test_open_loop_reports_send_lag_and_offered_rate(server: str) -> None:
    result = await run_open(server, "mlp", rate=200, duration=1.0, warmup=0.1)
    assert result.requests > 0 and result.errors == 0
    assert result.offered_rate == 200 and result.send_lag is not None


async def test_failed_requests_are_errors_with_the_servers_message(server: str) -> None:
    result = await run_closed(server, "encoder", concurrency=2, duration=1.0, warmup=0.0)
    assert result.errors == result.requests > 0
    assert "HTTP 500" in result.error_samples[0] and "boom" in result.error_samples[0]


def _closed(model: str, rps: float) -> LoadResult:
    return LoadResult(tool="wrk", mode="closed", model=model, url="u", duration_s=10,
                      requests=int(rps * 10), errors=0, rps=rps,
                      latency=Percentiles(1.0, 2.0, 3.0, 4.0), concurrency=64)  # fmt: skip


def test_ratios_are_per_round_with_the_median() -> None:
    report = Report(command="x", started=datetime.now(UTC))
    report.inprocess_rows_per_s["encoder"] = [100.0, 100.0, 100.0]
    for round_, (plain, mesh) in enumerate([(1000, 900), (500, 200), (2000, 1200)]):
        report.runs += [Run("plain", _closed("mlp", plain), round_),
                        Run("mesh", _closed("mlp", mesh), round_),
                        Run("mesh", _closed("encoder", 90.0), round_)]  # fmt: skip
    ranges, ratios = report.ratio_ranges(), report.ratios()
    assert ranges["mesh_over_plain_mlp"] == pytest.approx([0.9, 0.4, 0.6])
    assert ratios["mesh_over_plain_mlp"] == pytest.approx(0.6)
    assert ratios["encoder_mesh_over_inprocess_b32"] == pytest.approx(0.9)
    assert ratios["fused_over_plain_mlp"] is None
    assert "| mesh_over_plain_mlp | 0.60 | 0.90, 0.40, 0.60 |" in report.markdown()


def test_wrk_summary_line_is_parsed() -> None:
    from bench.wrk import MARKER

    line = (MARKER + '{"duration_us": 2000000, "requests": 100, "status": 2, '
            '"p50_us": 1000, "p99_us": 5000, "p999_us": 8000, "max_us": 9000, '
            '"connect": 0, "read": 0, "write": 0, "timeout": 0}')  # fmt: skip
    result = parse_wrk(f"noise\n{line}\n", url="u", model="mlp", concurrency=64, rows=1)
    assert result.requests == 100 and result.errors == 2
    assert result.latency.p99 == pytest.approx(5.0)


def test_a_ratio_report_reads_each_round_against_its_baseline() -> None:
    from bench.report import RatioReport
    from bench.tracing import TracingReport

    started = datetime(2026, 11, 23, 7, 35, tzinfo=UTC)
    report = RatioReport("cmd", started, baseline="stable", label="rollout")
    report.runs = {"stable": [_closed("mlp", 100.0), _closed("mlp", 200.0)],
                   "split": [_closed("mlp", 75.0), _closed("mlp", 100.0)]}
    assert report.ratios("split") == [0.75, 0.5]
    assert report.median_ratios() == {"split": 0.62}
    table = report.markdown().splitlines()
    assert table[4] == "| rollout | req/s (median) | p50 ms | p99 ms | ÷ stable, per round |"
    assert table[6:] == ["| stable | 200 | 1.00 | 2.00 | — |",
                         "| split | 100 | 1.00 | 2.00 | 0.75, 0.50 |"]

    tracing = TracingReport("cmd", started, baseline="off", label="tracing",
                            runs={"off": [_closed("mlp", 100.0)], "on": [_closed("mlp", 95.0)]},
                            cpu_us={"off": [800.0], "on": [840.0]})
    assert tracing.markdown().splitlines()[-1] == "| on | 95 | 1.00 | 2.00 | 0.95 | 840 | 1.05 |"
    assert tracing.to_dict()["cpu_ratios"] == {"on": [1.05]}
