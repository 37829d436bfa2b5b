"""`bench.faults_report`: the fault table's JSON as the Markdown of docs/RELIABILITY.md."""

from __future__ import annotations

from dataclasses import asdict

from bench.faults_report import render
from tests.faults.load import Outcome
from tests.faults.summary import recovery, summarise


def outcome(sent: float, status: int | None, *, latency: float | None = 0.05,
            error: str = "") -> Outcome:
    return Outcome(f"r{sent}", sent, status, latency, error)


def test_a_row_counts_failures_by_status_hangs_and_recovery() -> None:
    outcomes = [
        outcome(0.0, 200), outcome(1.0, 503, error="no live worker"),
        outcome(1.5, None, latency=None), outcome(2.0, None, error="ServerDisconnectedError"),
        outcome(2.5, 500, error="internal error"), outcome(3.0, 200), outcome(4.0, 200),
    ]
    row = summarise("worker kill -9", outcomes, fault_end=1.0, lost_log_rows=1)
    assert (row.sent, row.ok, row.hung) == (7, 3, 1)
    assert row.failed == {"503": 1, "connection": 1, "500": 1}
    assert row.unclear_failures == 1  # the 500
    # The first success after the last failure was answered at 3.05: 2.05 s after the fault.
    assert row.seconds_to_recover == 2.05


def test_recovery_is_none_when_nothing_succeeds_after_the_last_failure() -> None:
    assert recovery([outcome(0.0, 200), outcome(1.0, 503)], fault_end=0.5) is None
    assert recovery([outcome(0.0, 200)], fault_end=0.5) == 0.0


def test_the_markdown_table_has_one_line_per_fault() -> None:
    row = summarise("etcd paused 10 s", [outcome(0.0, 200), outcome(1.0, 503, error="x")],
                    fault_end=0.5, lost_log_rows=0)
    report = {"date": "2026-12-06T17:00:00+00:00", "cpus": 2, "deadline_s": 2.0,
              "rows": [asdict(row)]}
    lines = render(report).splitlines()
    assert lines[0].startswith("Run 2026-12-06T17:00:00+00:00 on 2 CPUs")
    assert lines[-1] == "| etcd paused 10 s | 2 | 1 | 1 × 503 | 0 | 0 | 0 | not recovered |"
