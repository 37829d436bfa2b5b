"""The batch window as a pure function: work-conserving when idle, full-or-late when busy."""

from __future__ import annotations

import pytest

from services.batcher.policy import MIN_LEAD, Dispatch, drain_seconds, plan_batch
from services.mesh.domain.types import BatchingPolicy

POLICY = BatchingPolicy(max_batch_size=8, max_queue_delay_ms=10.0)


def test_empty_queue_dispatches_nothing_and_arms_no_timer() -> None:
    decision = plan_batch(queued_rows=0, oldest_wait=5.0, worker_idle=True, policy=POLICY)
    assert decision == Dispatch(0)


@pytest.mark.parametrize(("queued", "expected"), [(1, 1), (5, 5), (8, 8), (20, 8)])
def test_idle_worker_takes_whatever_is_queued_up_to_max_batch_size(
    queued: int, expected: int
) -> None:
    decision = plan_batch(queued_rows=queued, oldest_wait=0.0, worker_idle=True, policy=POLICY)
    assert decision.rows == expected


def test_idle_worker_ignores_a_huge_queue_delay() -> None:
    slow = BatchingPolicy(max_batch_size=8, max_queue_delay_ms=10_000.0)
    decision = plan_batch(queued_rows=1, oldest_wait=0.0, worker_idle=True, policy=slow)
    assert decision.rows == 1


def test_busy_worker_waits_for_the_rest_of_the_window() -> None:
    decision = plan_batch(queued_rows=3, oldest_wait=0.004, worker_idle=False, policy=POLICY)
    assert decision.rows == 0
    assert decision.wait == pytest.approx(0.006)


def test_busy_worker_gets_a_full_batch_at_once() -> None:
    decision = plan_batch(queued_rows=8, oldest_wait=0.0, worker_idle=False, policy=POLICY)
    assert decision == Dispatch(8)


def test_busy_worker_gets_at_most_max_batch_size_of_an_overfull_queue() -> None:
    decision = plan_batch(queued_rows=30, oldest_wait=0.0, worker_idle=False, policy=POLICY)
    assert decision.rows == 8


@pytest.mark.parametrize("oldest_wait", [0.010, 0.5])
def test_busy_worker_gets_a_partial_batch_once_the_oldest_waited_the_delay(
    oldest_wait: float,
) -> None:
    decision = plan_batch(
        queued_rows=3, oldest_wait=oldest_wait, worker_idle=False, policy=POLICY
    )
    assert decision.rows == 3


def test_zero_delay_never_waits() -> None:
    eager = BatchingPolicy(max_batch_size=8, max_queue_delay_ms=0.0)
    decision = plan_batch(queued_rows=2, oldest_wait=0.0, worker_idle=False, policy=eager)
    assert decision.rows == 2


def test_busy_worker_with_a_long_batch_keeps_a_late_partial_batch_growing() -> None:
    decision = plan_batch(
        queued_rows=3, oldest_wait=0.020, worker_idle=False, policy=POLICY, free_in=0.200
    )
    assert decision.rows == 0
    assert decision.wait == pytest.approx(0.190)


def test_busy_worker_about_to_finish_gets_the_late_partial_batch() -> None:
    decision = plan_batch(
        queued_rows=3, oldest_wait=0.020, worker_idle=False, policy=POLICY, free_in=0.004
    )
    assert decision.rows == 3


def test_a_full_batch_waits_until_the_running_batch_is_about_to_end() -> None:
    """Sent 5 s before the worker can start it, a full batch's members would be fixed while
    requests due sooner arrive; it goes once the running batch ends within the lead."""
    decision = plan_batch(
        queued_rows=8, oldest_wait=0.0, worker_idle=False, policy=POLICY, free_in=5.0
    )
    assert decision.rows == 0
    assert decision.wait == pytest.approx(5.0 - 0.010)
    near_end = plan_batch(
        queued_rows=8, oldest_wait=0.0, worker_idle=False, policy=POLICY, free_in=0.010
    )
    assert near_end == Dispatch(8)


def test_a_full_batch_is_pipelined_within_the_minimum_lead_even_without_a_window() -> None:
    eager = BatchingPolicy(max_batch_size=8, max_queue_delay_ms=0.0)
    early = plan_batch(queued_rows=8, oldest_wait=0.0, worker_idle=False, policy=eager,
                       free_in=MIN_LEAD * 2)  # fmt: skip
    assert early.rows == 0 and early.wait == pytest.approx(MIN_LEAD)
    assert plan_batch(queued_rows=8, oldest_wait=0.0, worker_idle=False, policy=eager,
                      free_in=MIN_LEAD).rows == 8  # fmt: skip


def test_a_full_queue_asks_clients_back_after_its_expected_drain_time() -> None:
    drain = drain_seconds(queued_rows=64, batch_seconds=0.5, max_batch_size=16, workers=2)
    assert drain == pytest.approx(1.0)  # 2 workers x 16 rows / 0.5 s = 64 rows/s


def test_before_any_batch_was_timed_the_drain_time_is_a_default() -> None:
    drain = drain_seconds(queued_rows=64, batch_seconds=0.0, max_batch_size=16, workers=1)
    assert drain == 1.0


def test_realtime_behind_bulk_work_is_pipelined_at_once() -> None:
    # A busy worker makes a partial batch wait for its window, unless what it runs is bulk
    # work only: then realtime requests go at once, sized from when the bulk batch ends.
    waits = plan_batch(queued_rows=2, oldest_wait=0.0, worker_idle=False, policy=POLICY,
                       free_in=0.004)
    assert waits.rows == 0 and waits.wait is not None and waits.wait > 0
    goes = plan_batch(queued_rows=2, oldest_wait=0.0, worker_idle=False, policy=POLICY,
                      free_in=0.004, behind_bulk=True)
    assert goes == Dispatch(2)
    sized = plan_batch(queued_rows=8, oldest_wait=0.0, worker_idle=False, policy=POLICY,
                       free_in=0.004, behind_bulk=True, slack=0.010,
                       predict=lambda rows: 0.001 * rows)
    assert sized.rows == 6  # starts in 4 ms: 6 rows end by the 10 ms deadline, 7 would not
