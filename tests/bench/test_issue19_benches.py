"""Issue 19's benchmarks (bench.features, bench.cache, bench.jobs) in their quick form against
one real `infermesh up`, their pure parts, and their arguments refused with the field named."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from bench import cache, features, jobs
from bench.h2load import H2LOAD
from bench.jobs_report import JobsReport
from bench.mesh import Mesh, start_mesh
from deploy.localdeps import free_port

needs_h2load = pytest.mark.skipif(shutil.which(H2LOAD) is None,
                                  reason="h2load (nghttp2-client) not installed")  # fmt: skip
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One `infermesh up` for the module, with its own mesh credential (as a user runs it)."""
    logs = tmp_path_factory.mktemp("issue19-logs")
    args = argparse.Namespace(infermesh=".venv/bin/infermesh", ready_timeout=180.0)
    with pytest.MonkeyPatch.context() as patch, ExitStack() as stack:
        patch.delenv("INFERMESH_MESH_CREDENTIAL_FILE", raising=False)
        yield start_mesh(stack, args, logs, (free_port(), free_port() + 100))


@needs_h2load
@pytest.mark.timeout(400)
def test_features_quick_run_reports_each_mode_with_its_lookup(mesh: Mesh, tmp_path: Path) -> None:
    args = features.parse_args(["--quick"])
    report = features.FeaturesReport("test", NOW, hot=args.hot, entities=args.entities)
    features.measure(mesh, args, report, tmp_path)
    runs = {run.mode: run for run in report.runs}
    assert list(runs) == ["baseline", "warm", "cold"]
    assert runs["baseline"].statuses == {}
    assert set(runs["warm"].statuses.values()) == {"present"}
    assert set(runs["cold"].statuses.values()) == {"defaulted_stale"}
    for run in report.runs:
        assert run.requests > 0 and run.non_2xx == 0, run
        assert 0 < run.latency.p50 <= run.latency.p99
    added = report.added_p99(runs["warm"])
    assert added == pytest.approx(runs["warm"].latency.p99 - runs["baseline"].latency.p99)
    assert "| 0 | cold | 200 |" in report.markdown()


@pytest.mark.timeout(400)
def test_cache_quick_run_serves_hits_and_runs_a_burst_once(mesh: Mesh) -> None:
    args = cache.parse_args(["--quick"])
    report = cache.CacheReport("test", NOW)
    cache.measure(mesh, args, report)
    hits, misses = report.phases
    assert hits.served_as == {"miss": 1, "hit": args.requests - 1}
    assert misses.served_as == {"miss": args.requests}
    assert hits.router_p99_bound_ms is not None and misses.router_p99_bound_ms is not None
    [burst] = report.bursts
    assert burst.executions == 1  # the worker's own row counter
    assert sum(burst.served_as.values()) == 100 and burst.served_as.get("200 miss") == 1
    assert set(burst.served_as) <= {"200 miss", "200 coalesced", "200 hit"}


@needs_h2load
@pytest.mark.timeout(400)
def test_jobs_quick_run_finishes_every_row_beside_realtime(mesh: Mesh, tmp_path: Path) -> None:
    args = jobs.parse_args(["--quick"])
    report = JobsReport("test", NOW, realtime_fraction=args.realtime_fraction)
    jobs.measure(mesh, args, report, tmp_path)
    assert report.capacity_rows_per_s > 0
    assert len(report.job_beside) == 1 and len(report.realtime_alone) == 2
    for job in (report.job_alone, *report.job_beside):
        assert job is not None and job.rows == 8_000 and job.failed_rows == 0
        assert job.accepted <= job.done and job.rows_per_s > 0
    for realtime in (*report.realtime_alone, *report.realtime_beside):
        assert realtime.requests > 0
    assert "÷ closed loop" in report.markdown()
    orjson.dumps(report.to_dict())


def test_job_bodies_split_at_the_body_limit_and_keep_every_row_in_order() -> None:
    [whole] = jobs.job_bodies(10, 1 << 20)
    parts = jobs.job_bodies(10, len(whole) // 3)
    assert len(parts) >= 3 and all(len(p) <= len(whole) // 3 for p in parts)
    rows = [row for part in parts for row in orjson.loads(part)["inputs"]]
    assert rows == orjson.loads(whole)["inputs"] and orjson.loads(parts[0])["model"] == "mlp"


def test_the_router_histogram_delta_gives_the_p99_bucket() -> None:
    bounds = (0.0005, 0.001, 0.002, float("inf"))
    before = dict.fromkeys(bounds, 10.0)
    after = {0.0005: 10.0 + 90, 0.001: 10.0 + 99, 0.002: 10.0 + 100, float("inf"): 10.0 + 100}
    assert cache.p99_bound(before, after) == (1.0, 0.99)
    assert cache.p99_bound(before, before) == (None, None)


@pytest.mark.parametrize(("module", "argv", "field"), [
    (features, ["--hot", "0"], "--hot"),
    (features, ["--hot", "20", "--entities", "10"], "--hot"),
    (cache, ["--burst", "0"], "--burst"),
    (jobs, ["--realtime-fraction", "1.5"], "--realtime-fraction"),
    (jobs, ["--rows", "0"], "--rows"),
])  # fmt: skip
def test_bad_arguments_are_refused_naming_the_field(
    module: object, argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        module.parse_args(argv)  # type: ignore[attr-defined]
    assert exited.value.code == 2 and field in capsys.readouterr().err
