"""bench/autoscale.py's summary of a run (the run itself is the lead's, on a quiet machine)."""

from __future__ import annotations

from bench.autoscale import (
    Second,
    Sent,
    back_to_min_s,
    direction_changes,
    noise_factors,
    per_second,
    recovery_s,
)


def test_a_step_that_settles_after_two_seconds_and_a_fleet_back_at_one() -> None:
    fast, slow = 0.05, 3.0
    sent = [Sent(t + i / 10, slow if t in (2, 3) else fast, 200)
            for t in range(7) for i in range(10)]
    fleet = {0: (1, 1), 1: (1, 1), 2: (1, 3), 3: (2, 3), 4: (3, 3), 5: (3, 3), 6: (3, 3),
             7: (2, 2), 8: (1, 1)}
    rows = per_second(sent, fleet)
    assert [r.offered for r in rows[:7]] == [10] * 7 and rows[8].offered == 0
    assert rows[2].p99_ms == 3000.0 and rows[4].p99_ms == 50.0
    assert recovery_s(rows, step_at=2, step_end=7, slo_ms=1000) == 2.0
    assert back_to_min_s(rows, load_end=7) == 1.0


def test_a_failure_late_in_the_step_means_no_recovery() -> None:
    sent = [Sent(t, 0.01, 200 if t < 4 else 503) for t in range(5)]
    rows = per_second(sent, {t: (1, 1) for t in range(5)})
    assert rows[4].failed == 1 and rows[4].p99_ms is None
    assert recovery_s(rows, step_at=1, step_end=5, slo_ms=1000) is None
    assert back_to_min_s(rows, load_end=9) is None


def test_direction_changes_count_turns_of_the_desired_count_only() -> None:
    def rows(desired: list[int | None]) -> list[Second]:
        return [Second(t, 0, 0, 0, None, 1, d) for t, d in enumerate(desired)]

    assert direction_changes(rows([1, 1, 2, 3, 3, None, 3])) == 0
    assert direction_changes(rows([1, 2, 3, 2, 1])) == 1
    assert direction_changes(rows([1, 2, 1, 2, 1])) == 3


def test_noise_factors_stay_within_the_band_and_repeat_for_a_seed() -> None:
    factors = noise_factors(0.2, 5.0, 300.0, seed=7)
    assert len(factors) >= 60 and all(0.8 <= f <= 1.2 for f in factors)
    assert factors == noise_factors(0.2, 5.0, 300.0, seed=7)
