"""bench.open_tails: a small open-loop run against the real plain server, its arrival plan and
h2load command, how a log becomes percentiles, and that bad arguments name themselves."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import orjson
import pytest

from bench import cpu_per_request, open_tails, proc_cpu
from bench.h2load import H2LOAD, Response
from deploy.localdeps import free_port
from tests.bench.launches import fake_launches

needs_h2load = pytest.mark.skipif(shutil.which(H2LOAD) is None,
                                  reason="h2load (nghttp2-client) not installed")  # fmt: skip


def _plain_servers(port: int) -> list[int]:
    """Live plain servers on `port` (started by the bench under test)."""
    return [pid for pid in proc_cpu.all_stats()
            if proc_cpu.label_of(pid) == "plain server"
            and str(port) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]


@needs_h2load
def test_a_small_open_run_against_the_plain_server_reports_ordered_tails(tmp_path: Path) -> None:
    port = free_port()
    argv = ["--systems", "plain", "--fractions", "0.1", "--duration", "1", "--warmup", "0.2",
            "--connections", "4", "--max-requests", "200", "--max-concurrency", "4",
            "--warmup-requests", "0", "--plain-port", str(port),
            "--cache-dir", str(tmp_path / "models"), "--out", str(tmp_path / "open.json")]
    assert open_tails.main(argv) == 0
    report = orjson.loads((tmp_path / "open.json").read_bytes())
    assert report["maxima_rps"]["plain"] > 0
    [run] = report["runs"]
    assert run["system"] == "plain" and run["fraction"] == 0.1 and run["connections"] == 4
    assert run["target_rps"] == pytest.approx(0.1 * report["maxima_rps"]["plain"], rel=0.2)
    assert run["requests"] > 0 and run["achieved_rps"] > 0
    assert run["non_2xx"] == run["unanswered"] == 0
    assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["p999_ms"] <= run["latency"]["max"]
    assert run["client_cpu_s"] >= 0 and run["system_cpu_s"]["plain server"] > 0
    assert "| plain | 0.10 |" in (tmp_path / "open.md").read_text()
    assert _plain_servers(port) == []


def test_the_plan_spreads_each_connections_phase_over_one_period() -> None:
    arrivals = open_tails.plan(2000, connections=64, seconds=10)
    assert (arrivals.clients, arrivals.period_ms, arrivals.rate) == (64, 32, 2000)
    assert arrivals.cycles * arrivals.period_ms >= 10_000
    assert arrivals.spread_ms <= arrivals.period_ms
    command = open_tails.open_command("http://127.0.0.1:1", arrivals, Path("b"), Path("l"))
    flags = dict(zip(command[2:-1:2], command[3:-1:2], strict=True))  # after --h1
    assert command[1] == "--h1" and flags["--rps"] == "31.25"
    assert flags["-n"] == str(64 * arrivals.cycles) and flags["-c"] == "64"
    assert command[-1] == "http://127.0.0.1:1/v2/models/mlp/infer"
    with pytest.raises(ValueError, match="target rate"):
        open_tails.plan(0, connections=4, seconds=1)


def test_a_log_gives_2xx_percentiles_after_the_warmup_and_counts_the_rest() -> None:
    warm = [Response(100.0 + i * 0.01, 200, 5.0) for i in range(10)]  # before 100.5: skipped
    measured = [Response(101.0 + i * 0.01, 200, (i + 1) / 1000) for i in range(100)]
    failed = [Response(102.0, 503, 0.0001), Response(102.0, -1, 0.0001)]
    latency, achieved, non_2xx, requests = open_tails.summarise(warm + measured + failed, 0.5)
    assert (non_2xx, requests) == (2, 102)
    assert latency.p50 == pytest.approx(50.5) and latency.max == pytest.approx(100.0)
    assert achieved == pytest.approx(101 / 1.0)
    with pytest.raises(RuntimeError, match="warm-up"):
        open_tails.summarise(warm, 0.5)


def test_bad_fractions_and_systems_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        open_tails.main(["--fractions", "0.5,lots"])
    assert "--fractions" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--systems"):
        open_tails.main(["--systems", "triton"])
    with pytest.raises(SystemExit, match="--connections"):
        open_tails.main(["--systems", "plain", "--connections", "0"])


@pytest.mark.parametrize("system", ["fused", "fused2", "fused3", "replicas2", "mesh"])
def test_every_launcher_system_starts_from_the_settings_open_tails_gives(
    system: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It once failed on the first launcher system: start_system read `args.protocols`, an
    # option of bench.cpu_per_request only (the plain server's run above never reached it).
    args = open_tails._parser().parse_args(["--systems", system])
    started = fake_launches(monkeypatch)
    with ExitStack() as stack:
        assert cpu_per_request.start_system(stack, system, args, tmp_path)
    [(setup, env)] = started
    assert setup == system and "INFERMESH_EDGE" not in env  # REST straight to the gateway
