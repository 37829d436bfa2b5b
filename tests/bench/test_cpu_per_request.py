"""bench.cpu_per_request: a smoke run against the real plain server, its h2load parsing, its
report, and that it leaves no process behind, even when a run fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from bench import cpu_per_request, proc_cpu
from bench.cpu_report import CpuReport, SystemRun
from bench.h2load import H2LOAD
from deploy.localdeps import free_port
from tests.waiting import wait_for_sync

needs_h2load = pytest.mark.skipif(shutil.which(H2LOAD) is None,
                                  reason="h2load (nghttp2-client) not installed")  # fmt: skip
SUMMARY = """finished in 1.25s, 800.00 req/s, 120KB/s
requests: 1000 total, 1000 started, 998 done, 990 succeeded, 10 failed, 2 errored, 0 timeout
status codes: 990 2xx, 0 3xx, 0 4xx, 8 5xx
"""


def _plain_servers(port: int) -> list[int]:
    """Live plain servers on `port` (started by the bench under test)."""
    return [pid for pid in proc_cpu.all_stats()
            if proc_cpu.label_of(pid) == "plain server"
            and str(port) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]


def _argv(tmp_path: Path, port: int) -> list[str]:
    return ["--systems", "plain", "--requests", "200", "--concurrency", "4",
            "--warmup-requests", "20", "--plain-port", str(port),
            "--cache-dir", str(tmp_path / "models"), "--out", str(tmp_path / "cpu.json")]


@needs_h2load
def test_a_small_run_against_the_plain_server_reports_every_row(tmp_path: Path) -> None:
    port = free_port()
    assert cpu_per_request.main(_argv(tmp_path, port)) == 0
    table = (tmp_path / "cpu.md").read_text().splitlines()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table if line[:2] == "| "}
    for row in ("plain server", "**hops**", "**all processes**", "load generator (h2load)"):
        figure = rows[row].rstrip(" |").rsplit(" | ", 1)[1]
        assert float(figure.replace(",", "")) > 0, rows[row]
    assert rows["requests (errors)"].endswith("| 200 (0) |")
    assert rows["all ÷ plain"].endswith("| 1.00 |")
    p50, p99 = (float(ms) for ms in rows["latency p50 / p99 ms"].rstrip(" |")
                .rsplit(" | ", 1)[1].split(" / "))  # fmt: skip
    assert 0 < p50 <= p99, rows["latency p50 / p99 ms"]
    assert rows["p50 ÷ plain"].endswith("| 1.00 |")
    run = orjson.loads((tmp_path / "cpu.json").read_bytes())["runs"]["plain"]
    assert run["requests"] == run["succeeded"] == 200
    assert run["us_per_request"]["plain server"] > 0 and run["client_cpu_s"] > 0
    assert run["latency_ms"]["p50"] > 0 and run["p50_over_plain"] == 1.0
    assert _plain_servers(port) == []


@needs_h2load
def test_a_failed_run_stops_the_server_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_h2load(url: str, *, requests: int, concurrency: int, timeout: float) -> None:
        assert _plain_servers(port), "the server runs while the load does"
        raise RuntimeError("h2load broke")

    port = free_port()
    monkeypatch.setattr(cpu_per_request, "run_h2load", failing_h2load)
    with pytest.raises(RuntimeError, match="h2load broke"):
        cpu_per_request.main(_argv(tmp_path, port))
    assert _plain_servers(port) == []


def test_h2load_summary_gives_done_succeeded_and_seconds() -> None:
    assert cpu_per_request.parse_summary(SUMMARY) == (998, 990, 1.25)
    assert cpu_per_request.parse_summary(SUMMARY.replace("1.25s", "250ms"))[2] == 0.25
    assert cpu_per_request.parse_summary(SUMMARY.replace("1.25s", "242us"))[2] == 242e-6
    with pytest.raises(RuntimeError):
        cpu_per_request.parse_summary("h2load: connection refused")


def test_report_rows_run_in_request_order_with_ratios_to_plain() -> None:
    report = CpuReport("cmd", datetime(2026, 12, 6, tzinfo=UTC), requests=1000, concurrency=64)
    report.runs = [
        SystemRun("plain", 1000, 1000, 1.0, 0.01, {"plain server": 0.4}),
        SystemRun("mesh", 1000, 1000, 2.0, 0.01, {
            "registry": 0.01, "postgres": 0.05, "worker mlp/1": 0.2, "batcher": 0.15,
            "gateway": 0.2, "router": 0.15, "launcher": 0.01, "etcd": 0.02}),
    ]  # fmt: skip
    table = report.markdown().splitlines()
    first = next(i for i, line in enumerate(table) if line.startswith("| process"))
    assert [line.split(" | ")[0][2:] for line in table[first + 2 : first + 11]] == [
        "gateway", "router", "batcher", "worker mlp/1", "plain server", "postgres", "etcd",
        "registry", "launcher"]  # fmt: skip
    assert "| **hops** |  | 400 | 700 |" in table
    assert "| **all processes** |  | 400 | 790 |" in table
    assert "| hops ÷ plain |  | 1.00 | 1.75 |" in table
    mesh = report.to_dict()["runs"]["mesh"]  # type: ignore[index]
    assert mesh["groups_us_per_request"]["control plane"] == pytest.approx(20.0)
    assert mesh["all_over_plain"] == pytest.approx(790 / 400)


def test_a_process_tree_is_found_and_named() -> None:
    script = "import subprocess, sys; subprocess.run(['sleep', '30']); sys.exit(0)"
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        # Until the child has exec'd `sleep` it is a forked python: wait for the exec too.
        labels = wait_for_sync(
            lambda: sorted(proc_cpu.label_of(key.pid) for key in proc_cpu.tree_cpu([parent.pid])),
            lambda found: len(found) == 2 and "sleep" in found,
            timeout=30, what="the parent and its child sleep",
        )
        assert labels[0].startswith("python") and labels[1] == "sleep"
    finally:
        proc_cpu.kill_leftovers(proc_cpu.tree_cpu([parent.pid]))
        parent.wait(timeout=30)


@pytest.mark.parametrize(("env", "label"), [
    ({"INFERMESH_FUSED_PROCESSES": "1"}, "fused (gateway+router+batcher+worker)"),
    ({"INFERMESH_FUSED_PROCESSES": "2"}, "fused (gateway+router+batcher+worker)"),
    ({"INFERMESH_FUSED_PROCESSES": "3"}, proc_cpu.FUSED_CORE),
    ({"INFERMESH_FUSED_PROCESSES": "3", "INFERMESH_FUSED_CORE_PUBLIC": "1"},
     "fused (gateway+router+batcher+worker)"),
    ({"INFERMESH_FUSED_PROCESSES": "3", "INFERMESH_FUSED_ROLE": "front"}, proc_cpu.FUSED_FRONT),
])
def test_a_fused_process_is_named_by_what_it_serves(env: dict[str, str], label: str) -> None:
    # `python -m deploy.fused` is only its command line here: the label comes from it and
    # the environment, as the launcher sets them (deploy/fused.py's core_serves_public).
    script = "import time; time.sleep(30)"
    process = subprocess.Popen([sys.executable, "-c", script, "-m", "deploy.fused"],
                               env={**os.environ, **env})
    try:
        # Until the child has exec'd, its command line is empty or the forking Python's.
        wait_for_sync(lambda: Path(f"/proc/{process.pid}/cmdline").read_bytes(),
                      lambda cmdline: b"deploy.fused" in cmdline,
                      timeout=30, what="the child's exec")
        assert proc_cpu.label_of(process.pid) == label
    finally:
        process.kill()
        process.wait(timeout=30)
