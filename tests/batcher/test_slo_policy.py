"""The SLO rules as pure functions (issue 14): admission by predicted latency, early dispatch,
batch sizing to the earliest deadline, preferred sizes, and rows counted per request."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.batcher.admission import Backlog, refusal
from services.batcher.fairness import FairQueue
from services.batcher.policy import MAX_RETRY_AFTER, Dispatch, Predictor, plan_batch
from services.mesh.domain.types import BatchingPolicy

POLICY = BatchingPolicy(max_batch_size=16, max_queue_delay_ms=10.0)


def linear(per_row: float, fixed: float) -> Predictor:
    def predict(rows: int) -> float:
        return per_row * rows + fixed
    return predict


MS = 0.001
PREDICT = linear(1 * MS, 2 * MS)  # 1 ms per row + 2 ms


# Admission ----------------------------------------------------------------------------------

BACKLOG = Backlog(queued_rows=100, throughput=1000.0, running_predicted=0.005)
"""100 rows ahead at 1000 rows/s (0.1 s) behind a batch ending in 5 ms: clears in 0.105 s."""


def test_a_request_that_finishes_exactly_at_its_deadline_is_admitted() -> None:
    assert refusal(backlog=BACKLOG, execution=0.010, slack=0.115) is None


def test_a_request_predicted_past_its_deadline_is_refused_with_the_backlog_as_retry_after() -> None:
    retry_after = refusal(backlog=BACKLOG, execution=0.010, slack=0.114)
    assert retry_after == pytest.approx(0.105)


@pytest.mark.parametrize("case", ["off", "no deadline", "no model", "no execution"])
def test_admission_admits_what_it_cannot_judge(case: str) -> None:
    backlog = Backlog(100, None) if case == "no model" else BACKLOG
    assert refusal(
        backlog=backlog, execution=None if case == "no execution" else 0.010,
        slack=None if case == "no deadline" else 0.001, enabled=case != "off",
    ) is None


def test_retry_after_is_bounded() -> None:
    huge = Backlog(queued_rows=10**9, throughput=1.0)
    assert refusal(backlog=huge, execution=0.01, slack=1.0) == MAX_RETRY_AFTER


# Early dispatch -----------------------------------------------------------------------------


def test_a_busy_worker_waits_for_a_fuller_batch_while_the_earliest_deadline_allows() -> None:
    # 4 ms left of the window, then 3 rows take 5 ms: done in 9 ms, the deadline in 20 ms.
    decision = plan_batch(queued_rows=3, oldest_wait=6 * MS, worker_idle=False, policy=POLICY,
                          slack=20 * MS, predict=PREDICT)
    assert decision.rows == 0 and decision.wait == pytest.approx(4 * MS)


def test_a_busy_worker_gets_the_batch_early_when_waiting_would_miss_the_deadline() -> None:
    # Waiting 4 ms more, then 5 ms of execution, passes a deadline 8 ms away: send it now.
    decision = plan_batch(queued_rows=3, oldest_wait=6 * MS, worker_idle=False, policy=POLICY,
                          slack=8 * MS, predict=PREDICT)
    assert decision == Dispatch(3)


def test_early_dispatch_counts_the_running_batch() -> None:
    # The running batch ends in 12 ms (past the window): 12 + 5 > 15 ms to the deadline.
    decision = plan_batch(queued_rows=3, oldest_wait=0.0, worker_idle=False, policy=POLICY,
                          free_in=12 * MS, slack=15 * MS, predict=PREDICT)
    assert decision.rows == 3


# Sizing -------------------------------------------------------------------------------------


def test_the_batch_is_the_largest_that_meets_the_earliest_deadline() -> None:
    # n rows take n + 2 ms; 10 ms to the deadline: 8 rows, not the 16 queued.
    decision = plan_batch(queued_rows=40, oldest_wait=0.0, worker_idle=True, policy=POLICY,
                          slack=10 * MS, predict=PREDICT)
    assert decision == Dispatch(8)


def test_sizing_counts_the_wait_for_the_running_batch() -> None:
    decision = plan_batch(queued_rows=40, oldest_wait=0.0, worker_idle=False, policy=POLICY,
                          free_in=3 * MS, slack=10 * MS, predict=PREDICT)
    assert decision == Dispatch(5)


def test_when_no_size_meets_the_deadline_the_batch_is_full() -> None:
    decision = plan_batch(queued_rows=40, oldest_wait=0.0, worker_idle=True, policy=POLICY,
                          slack=1 * MS, predict=PREDICT)
    assert decision == Dispatch(16)


def test_without_a_deadline_or_a_model_the_window_rules_alone() -> None:
    for slack, predict in ((None, PREDICT), (10 * MS, None)):
        decision = plan_batch(queued_rows=40, oldest_wait=0.0, worker_idle=True,
                              policy=POLICY, slack=slack, predict=predict)
        assert decision == Dispatch(16)


@pytest.mark.parametrize(("queued", "slack", "expected"), [
    (7, None, 4),     # cannot be full: the largest preferred size that fits
    (3, None, 3),     # no preferred size fits: what is there
    (40, None, 16),   # full: max_batch_size
    (40, 0.008, 4),   # the deadline allows 6: rounded down to 4
])
def test_preferred_sizes_round_a_partial_batch_down(
    queued: int, slack: float | None, expected: int
) -> None:
    policy = BatchingPolicy(max_batch_size=16, max_queue_delay_ms=10.0,
                            preferred_batch_sizes=(4, 8))
    decision = plan_batch(queued_rows=queued, oldest_wait=0.0, worker_idle=True,
                          policy=policy, slack=slack, predict=PREDICT)
    assert decision == Dispatch(expected)


# Multi-row accounting -----------------------------------------------------------------------


@dataclass
class _Item:
    rows: int
    tenant: str = "t"
    lane: str = "realtime"
    enqueued: float = 0.0
    deadline: float | None = None


def test_a_five_row_request_counts_five_and_is_never_split() -> None:
    queue: FairQueue[_Item] = FairQueue(100, lambda _: 1.0)
    for rows in (5, 5, 1):
        queue.admit(_Item(rows))
    assert queue.rows == 11
    # The deadline allows 3 rows: the 5-row request still goes whole, and alone.
    rows = plan_batch(queued_rows=queue.rows, oldest_wait=0.0, worker_idle=True,
                      policy=POLICY, slack=5 * MS, predict=PREDICT).rows
    assert rows == 3
    assert [item.rows for item in queue.take(rows, 0.0)] == [5]
    assert [item.rows for item in queue.take(8, 0.0)] == [5, 1]
    # Admission counts rows too: 10 rows ahead at 1000 rows/s is 10 ms, not 2 requests' worth.
    backlog = Backlog(queued_rows=10, throughput=1000.0)
    assert refusal(backlog=backlog, execution=0.002, slack=0.011) is not None
