"""bench.goodput's pure parts: h2load logs and schedules, goodput, attainment, late answers."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from bench import goodput
from bench.goodput import slo_body
from bench.goodput_report import GoodputReport
from bench.goodput_stats import Measurement, Outcome, Window, tally, whole_periods, window_of
from bench.h2load import (
    H2LOAD,
    Arrivals,
    Response,
    StreamArrivals,
    parse_log,
    run_together,
    started_requests,
)

LOG = (
    "1700000000000000\t200\t40000\n"  # on time for 50 ms
    "1700000000100000\t200\t60000\n"  # late for 50 ms, on time for 250 ms
    "1700000000200000\t503\t900\n"
    "1700000000300000\t504\t50100\n"
    "1700000000400000\t-1\t0\n"
    "1700000005000000\t200\t1000\n"  # outside the window
)
WINDOW = Window(1_700_000_000.0, 1_700_000_001.0)


def test_parse_log_reads_start_status_and_latency() -> None:
    responses = parse_log(LOG + "\n")
    assert len(responses) == 6
    assert responses[0] == Response(1_700_000_000.0, 200, 0.04)
    assert responses[4].status == -1


def test_tally_splits_on_time_late_refused_expired_and_failed() -> None:
    outcome = tally(parse_log(LOG), 0.05, WINDOW)
    assert (outcome.sent, outcome.on_time, outcome.late) == (5, 1, 1)
    assert (outcome.refused, outcome.expired, outcome.failed) == (1, 1, 1)
    assert outcome.max_late_ms == pytest.approx(10.0)
    # Admitted: everything but the 503; a failed stream has no latency to report.
    assert outcome.attainment == pytest.approx(1 / 4)
    assert sorted(outcome.admitted_latencies) == pytest.approx([0.04, 0.0501, 0.06])


def test_a_looser_deadline_turns_the_late_answer_on_time() -> None:
    outcome = tally(parse_log(LOG), 0.25, WINDOW)
    assert (outcome.on_time, outcome.late, outcome.max_late_ms) == (2, 0, 0.0)


def test_measurement_combines_classes_into_goodput_per_second() -> None:
    responses = parse_log(LOG)
    run = Measurement("bursty", 1.5, "predictive", 0, WINDOW.seconds,
                      {0.05: tally(responses, 0.05, WINDOW),
                       0.25: tally(responses, 0.25, WINDOW)})  # fmt: skip
    assert run.goodput == pytest.approx(3.0)  # 1 + 2 on time in one second
    assert run.offered == pytest.approx(10.0)
    assert run.total.late == 1
    assert run.total.attainment == pytest.approx(3 / 8)
    assert run.to_dict()["refused_share"] == pytest.approx(0.2)


def test_nothing_admitted_has_no_attainment() -> None:
    refused = [Response(WINDOW.start, 503, 0.001)] * 3
    outcome = tally(refused, 0.05, WINDOW)
    assert outcome.attainment is None and outcome.share(outcome.refused) == 1.0


def test_window_starts_warmup_after_the_first_request_of_any_log() -> None:
    first = [Response(10.0, 200, 0.01)]
    second = [Response(9.5, 200, 0.01), Response(20.0, 200, 0.01)]
    assert window_of([first, second], warmup=1.0, duration=5.0) == Window(10.5, 15.5)


@pytest.mark.parametrize("rate", [0.4, 3.0, 250.0, 457.5, 1050.0, 1500.0, 4321.0])
@pytest.mark.parametrize("duty", [1.0, 0.25])
def test_arrivals_offer_the_asked_mean_rate_within_the_on_phase(rate: float, duty: float) -> None:
    arrivals = Arrivals.plan(rate, period_ms=1000, duty=duty, seconds=10.0)
    # Whole clients in whole milliseconds: the period absorbs the rounding.
    assert arrivals.rate == pytest.approx(rate, rel=2e-3)
    assert arrivals.cycles * arrivals.period_ms >= 10_000
    # Every client starts within the on-phase (the whole period if uniform, its first quarter
    # if bursty: 4x the mean rate while on). h2load starts clients per whole-ms tick, so the
    # on-phase may end a little early; a tenth of it at most at these rates.
    on_ms = arrivals.period_ms * duty
    assert 0.9 * on_ms <= arrivals.spread_ms <= on_ms + arrivals.tick_ms


def test_uniform_arrivals_fill_the_period_evenly() -> None:
    arrivals = Arrivals.plan(1500.0, period_ms=1000, duty=1.0, seconds=2.0)
    assert (arrivals.per_tick, arrivals.tick_ms, arrivals.clients) == (3, 2, 1500)
    slow = Arrivals.plan(2.0, period_ms=1000, duty=1.0, seconds=2.0)
    assert (slow.per_tick, slow.tick_ms, slow.clients, slow.spread_ms) == (1, 500, 2, 1000)


def test_timing_script_sends_once_per_period() -> None:
    arrivals = Arrivals.plan(10.0, period_ms=500, duty=0.25, seconds=1.2)
    assert arrivals.timing_script("http://x/infer").splitlines() == [
        "0.0\thttp://x/infer", "500.0\thttp://x/infer", "1000.0\thttp://x/infer",
    ]  # fmt: skip


def test_slo_body_carries_the_deadline_as_the_oip_timeout_parameter() -> None:
    body = orjson.loads(slo_body("mlp", 0.05))
    assert body["parameters"] == {"timeout": 0.05}
    assert body["inputs"][0]["shape"] == [1, 32]


def test_started_requests_reads_h2load_summary() -> None:
    summary = "finished in 1.01s\nrequests: 4 total, 2 started, 0 done, 0 succeeded, 4 failed\n"
    assert started_requests(summary) == 2
    with pytest.raises(RuntimeError):
        started_requests("h2load: connection refused")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """Answers every POST at once."""

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"outputs": []})

    app = web.Application()
    app.router.add_post("/infer", infer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/infer"
    await runner.cleanup()


@pytest.mark.skipif(shutil.which(H2LOAD) is None, reason="h2load (nghttp2-client) not installed")
async def test_h2load_plays_the_schedule_and_logs_every_request(
    server: str, tmp_path: Path
) -> None:
    arrivals = Arrivals.plan(200.0, period_ms=500, duty=1.0, seconds=1.0)
    script, body, log = tmp_path / "script", tmp_path / "body.json", tmp_path / "log.tsv"
    script.write_text(arrivals.timing_script(server))
    body.write_bytes(slo_body("mlp", 0.25))
    command = arrivals.command(script, body, log, ["Content-Type: application/json"], idle_s=30)
    summary = tmp_path / "h2load.out"
    cpu = await asyncio.to_thread(run_together, [command], [summary], 60.0)
    responses = parse_log(log.read_text())
    assert len(responses) == started_requests(summary.read_text()) == 200
    assert {r.status for r in responses} == {200}
    assert cpu >= 0.0
    # 100 clients, one every 5 ms, each sending twice 500 ms apart: the first sends span the
    # whole first period, not one instant (h2load times each client from its own start). A busy
    # machine only stretches the span, so the bound holds under load.
    starts = sorted(r.start_s for r in responses)
    assert starts[99] - starts[0] >= 0.4


def test_report_compares_modes_within_each_round() -> None:
    report = GoodputReport("python -m bench.goodput", datetime.now(UTC), model="mlp",
                           setup="mesh", deadlines=(0.05, 0.25))  # fmt: skip
    for round_, (predictive, static) in enumerate([(90, 60), (80, 40)]):
        for mode, on_time in (("static", static), ("predictive", predictive)):
            outcome = Outcome(sent=100, on_time=on_time, admitted_latencies=[0.01])
            report.runs.append(Measurement("bursty", 2.0, mode, round_, 1.0, {0.05: outcome}))
    assert report.ratios() == {"bursty 2x": [1.5, 2.0]}
    assert "| bursty 2x | 1.50, 2.00 |" in report.markdown()
    strict = Outcome(sent=100, on_time=30, admitted_latencies=[0.01])
    report.runs.append(Measurement("bursty", 2.0, "strict", 0, 1.0, {0.05: strict}))
    assert report.ratios()["strict bursty 2x"] == [0.5]


def test_run_files_of_a_fractional_load_do_not_collide(tmp_path: Path) -> None:
    # "h2load-r0-uniform-0.5x-static-50ms": Path.with_suffix would cut at "0." and give every
    # class and mode of the 0.5x and 1.5x loads one shared log file.
    from bench.goodput import _beside

    names = {_beside(tmp_path / f"h2load-r0-uniform-{load:g}x-{mode}-{ms}ms", ".tsv")
             for load in (0.5, 1.5) for mode in ("predictive", "static") for ms in (50, 250)}
    assert len(names) == 8
    assert all(name.name.endswith("ms.tsv") for name in names)


def test_stream_arrivals_offer_the_rate_over_a_few_connections() -> None:
    uniform = StreamArrivals.plan(2000, period_ms=1000, duty=1.0, seconds=3, clients=8)
    assert uniform.clients == 8 and len(uniform.offsets_ms) == 250 * 3
    assert uniform.rate == pytest.approx(2000, rel=0.01)
    offsets = uniform.offsets_ms
    gaps = {round(b - a, 6) for a, b in zip(offsets, offsets[1:], strict=False)}
    assert gaps == {4.0}  # an even grid: 250 per client per second
    bursty = StreamArrivals.plan(2000, period_ms=1000, duty=0.25, seconds=2, clients=8)
    assert all(offset % 1000 < 250 for offset in bursty.offsets_ms)  # the on-phase only
    assert len(bursty.offsets_ms) == 500
    command = bursty.command(Path("s"), Path("b"), Path("l"), ["x: y"], idle_s=5)
    assert "--h1" not in command and command[command.index("-m") + 1] == "1024"
    assert command[command.index("-n") + 1] == str(8 * 500)
    assert bursty.timing_script("http://e/v2/x").splitlines()[1] == "1.000\thttp://e/v2/x"


def test_the_goodput_bound_is_what_arrivals_and_deadlines_allow() -> None:
    from bench.goodput_report import goodput_bound

    # Uniform: whatever is offered up to capacity.
    assert goodput_bound(0.5, duty=1.0, period_s=1.0, longest_deadline_s=0.25) == 0.5
    assert goodput_bound(2.0, duty=1.0, period_s=1.0, longest_deadline_s=0.25) == 1.0
    # Bursty, the mlp (1 s period, 250 ms on, 250 ms deadline): busy half of each period.
    assert goodput_bound(2.0, duty=0.25, period_s=1.0, longest_deadline_s=0.25) == 0.5
    # The encoder (6 s period, 1.5 s on, 3 s deadline): three quarters.
    assert goodput_bound(1.5, duty=0.25, period_s=6.0, longest_deadline_s=3.0) == 0.75
    assert goodput_bound(0.4, duty=0.25, period_s=6.0, longest_deadline_s=3.0) == 0.4


@pytest.mark.parametrize("rate", [502.5, 1000.0, 3048.0, 0.5])
@pytest.mark.parametrize("clients", [1, 4, 32])
def test_arrivals_never_start_more_clients_per_tick_than_there_are(
    rate: float, clients: int
) -> None:
    """h2load refuses `-r` larger than `-c` (a realtime loop over 4 connections at 500 req/s
    asked for 5 per tick of 4 clients)."""
    period_ms = max(1, round(clients / rate * 1000))
    arrivals = Arrivals.plan(rate, period_ms=period_ms, duty=1.0, seconds=4)
    assert 1 <= arrivals.per_tick <= arrivals.clients
    assert arrivals.rate == pytest.approx(rate, rel=0.5)


@pytest.mark.parametrize(("warmup", "duration", "period", "expected"), [
    (2.0, 10.0, 1.0, (2.0, 10.0)),  # the mlp's 1 s periods: already whole
    (2.0, 10.0, 6.0, (6.0, 12.0)),  # the encoder's: one period of warm-up, two measured
    (1.0, 3.0, 6.0, (6.0, 6.0)),  # --quick: at least one period measured
    (0.0, 20.0, 6.0, (0.0, 18.0)),
])  # fmt: skip
def test_runs_warm_up_and_measure_whole_arrival_periods(
    warmup: float, duration: float, period: float, expected: tuple[float, float]
) -> None:
    assert whole_periods(warmup, duration, period) == pytest.approx(expected)


def test_a_whole_period_window_offers_the_mean_rate_of_a_bursty_schedule() -> None:
    """The encoder's bursty schedule (6 s periods, all of each in its first 1.5 s): a window of
    2 s warm-up + 10 s held one on-phase of the two sent, so it offered 0.6x the asked rate;
    whole periods offer the asked rate."""
    rate, period_ms = 100.0, 6000
    warmup, duration = whole_periods(2.0, 10.0, period_ms / 1000)
    plan = StreamArrivals.plan(rate, period_ms=period_ms, duty=0.25, seconds=warmup + duration)
    sends = [Response(offset / 1000, 200, 0.01)
             for _ in range(plan.clients) for offset in plan.offsets_ms]  # fmt: skip
    window = window_of([sends], warmup=warmup, duration=duration)
    sent = sum(1 for r in sends if window.start <= r.start_s < window.end)
    assert sent / window.seconds == pytest.approx(rate, rel=0.02)
    cut = window_of([sends], warmup=2.0, duration=10.0)
    assert sum(1 for r in sends if cut.start <= r.start_s < cut.end) / cut.seconds < 0.7 * rate


def test_a_fixed_capacity_scales_the_loads_instead_of_the_measured_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--capacity-rps`: an A/B at the same offered rates, however far the closed loop moved
    between starts (49-92 req/s for one encoder mesh in one session)."""
    from bench import goodput
    from bench.result import LoadResult, Percentiles

    measured = LoadResult("h2load", "closed", "encoder", "u", 10.0, 500, 0, 50.0,
                          Percentiles.of([0.5]), concurrency=64)  # fmt: skip
    monkeypatch.setattr(goodput, "mode_policies", lambda *args: {"current": None})
    monkeypatch.setattr(goodput, "edge_closed_loop", lambda *args: measured)
    args = goodput._parser().parse_args(["--model", "encoder", "--client", "h2", "--rounds", "0",
                                         "--capacity-rps", "80"])  # fmt: skip
    report = GoodputReport("x", datetime.now(UTC), model="encoder", setup="mesh",
                           deadlines=(1.0, 3.0))  # fmt: skip
    target = goodput.Target("g", "r", tmp_path, tmp_path, edge="e")
    goodput.measure(report, target, args)
    assert report.capacity_rps == 80.0
    assert any("50.0 req/s measured" in note for note in report.notes)


def test_modes_choose_the_admission_policies_compared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--modes predictive strict static`: `admission: strict` beside the other two."""
    from bench import goodput
    from bench.result import LoadResult, Percentiles

    measured = LoadResult("h2load", "closed", "encoder", "u", 10.0, 500, 0, 50.0,
                          Percentiles.of([0.5]), concurrency=64)  # fmt: skip
    policies = {mode: {"admission": mode} for mode in goodput.MODES}
    monkeypatch.setattr(goodput, "mode_policies", lambda *args: policies)
    monkeypatch.setattr(goodput, "edge_closed_loop", lambda *args: measured)
    monkeypatch.setattr(goodput, "apply_mode", lambda *args: None)
    monkeypatch.setattr(goodput, "SETTLE_S", 0.0)
    ran: list[str] = []
    monkeypatch.setattr(goodput, "one_run", lambda *args, **kwargs: ran.append(kwargs["mode"]))
    args = goodput._parser().parse_args(["--model", "encoder", "--client", "h2", "--rounds", "1",
                                         "--loads", "1", "--modes", "strict", "static"])
    report = GoodputReport("x", datetime.now(UTC), model="encoder", setup="mesh",
                           deadlines=(1.0, 3.0))  # fmt: skip
    goodput.measure(report, goodput.Target("g", "r", tmp_path, tmp_path, edge="e"), args)
    assert sorted(set(ran)) == ["static", "strict"]
    assert goodput._parser().parse_args([]).modes == ["predictive", "static"]


@pytest.mark.parametrize("processes", ["2", "3"])
def test_several_processes_go_with_fused_mode(processes: str) -> None:
    with pytest.raises(SystemExit, match=f"--processes {processes} goes with --fused"):
        goodput.main(["--processes", processes])


@pytest.mark.parametrize("argv", [
    ["--layout", "replicas"], ["--fused", "--layout", "replicas"],
    ["--fused", "--processes", "3", "--layout", "replicas"],
])
def test_replicas_go_with_two_fused_processes(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="--layout replicas goes with --fused --processes 2"):
        goodput.main(argv)
