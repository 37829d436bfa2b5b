from __future__ import annotations

from dataclasses import replace

import pytest

from control.guard.metrics import Buckets, VersionFigures
from control.guard.policy import Verdict, canary_weight, evaluate, next_rollout, p99, quantile
from control.guard.spec import GuardSpec
from services.mesh.domain.types import Rollout, Route, ShadowRoute

INF = float("inf")
SPEC = GuardSpec(canary="v2", baseline="v1", window_s=30, min_samples=50,
                 max_error_rate_delta=0.05, max_p99_ratio=2.0)


def latencies(count: float, *, at: float = 0.002) -> Buckets:
    """`count` requests, all in the bucket whose upper bound is `at`."""
    bounds = (0.001, 0.002, 0.005, 0.01, 0.05)
    return tuple((le, count if le >= at else 0.0) for le in bounds) + ((INF, count),)


def side(success: float, failure: float = 0.0, *, at: float = 0.002) -> VersionFigures:
    return VersionFigures(success, failure, buckets=latencies(success + failure, at=at))


def judge(canary: VersionFigures, baseline: VersionFigures, *, spec: GuardSpec = SPEC,
          held_s: float = 30, current_weight: float = 10) -> Verdict:
    return evaluate(spec, canary, baseline, held_s=held_s, current_weight=current_weight)


def test_p99_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    buckets = ((0.001, 0.0), (0.002, 50.0), (0.004, 100.0), (INF, 100.0))
    # rank 99 lies in (0.002, 0.004]: 49 of the bucket's 50 observations in.
    assert p99(buckets) == pytest.approx(0.002 + 0.002 * 49 / 50)
    assert quantile(0.5, buckets) == pytest.approx(0.002)
    assert quantile(0.25, buckets) == pytest.approx(0.001 + 0.001 * 25 / 50)
    # The first bucket starts at 0.
    assert quantile(0.5, ((0.01, 10.0), (INF, 10.0))) == pytest.approx(0.005)


def test_p99_in_the_inf_bucket_is_the_largest_finite_bound_and_empty_is_none() -> None:
    assert p99(((0.01, 1.0), (10.0, 1.0), (INF, 100.0))) == 10.0
    assert p99(((0.01, 0.0), (INF, 0.0))) is None
    assert p99(()) is None


def test_failing_canary_rolls_back_with_the_figures() -> None:
    verdict = judge(side(0, 120, at=0.005), side(1080), held_s=45)

    assert verdict.action == "rollback"
    assert verdict.reason == (
        "canary v2 error rate 100.0% vs baseline v1 0.0% (allowed +5.0%) over 30 s, "
        "120 vs 1080 requests; p99 5.0 ms vs 2.0 ms (allowed ×2)"
    )


def test_error_rate_within_the_allowed_delta_holds() -> None:
    assert judge(side(95, 5), side(980, 20)).action == "hold"  # 5% vs 2% + 5%
    assert judge(side(92, 8), side(980, 20)).action == "rollback"  # 8% > 2% + 5%


def test_a_canary_failing_alone_rolls_back_while_the_baseline_is_idle() -> None:
    verdict = judge(side(80, 20), side(3))

    assert verdict.action == "rollback"
    assert "error rate 20.0% vs baseline v1 0.0%" in verdict.reason
    assert "100 vs 3 requests" in verdict.reason


def test_a_healthy_canary_holds_while_the_baseline_is_idle() -> None:
    verdict = judge(side(100, 2), side(3))

    assert verdict.action == "hold"
    assert verdict.reason.startswith("waiting for 50 requests each: canary v2")


def test_too_few_canary_requests_hold_even_when_they_all_fail() -> None:
    verdict = judge(side(0, 49), side(1000))

    assert verdict.action == "hold" and "49 vs 1000 requests" in verdict.reason


def test_slow_canary_rolls_back_on_p99() -> None:
    verdict = judge(side(100, at=0.01), side(1000, at=0.002))

    assert verdict.action == "rollback"
    assert verdict.reason.startswith("canary v2 p99 10.0 ms vs baseline v1 2.0 ms (allowed ×2)")
    assert verdict.reason.endswith("100 vs 1000 requests; error rate 0.0% vs 0.0% (allowed +5.0%)")
    loose = replace(SPEC, max_p99_ratio=3.0)  # 4.97 ms vs 1.99 ms is within ×3
    assert judge(side(100, at=0.005), side(1000), spec=loose).action == "hold"


def test_healthy_canary_without_steps_holds() -> None:
    verdict = judge(side(100), side(1000), held_s=3600)

    assert verdict == Verdict("hold", verdict.reason) and verdict.reason.startswith("healthy:")


def test_healthy_canary_advances_to_the_next_step_after_the_interval() -> None:
    spec = GuardSpec("v2", "v1", min_samples=50, steps=(5, 25, 50, 100), step_interval_s=60)

    early = judge(side(100), side(1000), spec=spec, held_s=59, current_weight=5)
    assert early.action == "hold" and "step to 25% after 60 s (held 59 s)" in early.reason

    ready = judge(side(100), side(1000), spec=spec, held_s=60, current_weight=5)
    assert ready.action == "advance" and ready.next_weight == 25
    assert ready.reason.startswith("advanced v2 from 5% to 25%: canary v2 error rate 0.0%")

    between = judge(side(100), side(1000), spec=spec, held_s=60, current_weight=10)
    assert between.next_weight == 25

    last = judge(side(100), side(1000), spec=spec, held_s=60, current_weight=50)
    assert last.action == "advance" and last.next_weight == 100
    assert last.reason.startswith("promoted v2 to 100%")


def test_no_advance_without_enough_baseline_samples() -> None:
    spec = GuardSpec("v2", "v1", min_samples=50, steps=(50, 100), step_interval_s=0)

    assert judge(side(100), side(10), spec=spec, held_s=600).action == "hold"


ROLLOUT = Rollout(
    "iris", (Route("v1", 90), Route("v2", 10)), sticky_key="user", salt="s1",
    shadow=(ShadowRoute("v3", 0.25),), fallback="v1", epoch=7, guard={"steps": [10, 50, 100]},
)


def test_rollback_sends_everything_to_the_baseline_and_drops_the_guard() -> None:
    rolled = next_rollout(ROLLOUT, SPEC, Verdict("rollback", "bad"))

    assert rolled is not None
    assert rolled.routes == (Route("v1", 100),) and rolled.fallback == "v1"
    assert rolled.guard is None
    assert (rolled.sticky_key, rolled.salt, rolled.shadow) == ("user", "s1", ROLLOUT.shadow)


def test_advance_moves_weight_and_keeps_the_guard() -> None:
    advanced = next_rollout(ROLLOUT, SPEC, Verdict("advance", "ok", next_weight=50))

    assert advanced is not None
    assert advanced.routes == (Route("v1", 50), Route("v2", 50))
    assert advanced.guard == {"steps": [10, 50, 100], "canary": "v2", "baseline": "v1"}
    assert advanced.fallback == "v1"
    assert advanced.shadow == ROLLOUT.shadow


def test_advance_keeps_other_routes_and_gives_the_baseline_the_rest() -> None:
    three = Rollout("iris", (Route("v1", 80), Route("v2", 10), Route("v3", 10)), fallback="v1")

    advanced = next_rollout(three, SPEC, Verdict("advance", "ok", next_weight=50))

    assert advanced is not None
    assert advanced.routes == (Route("v1", 40), Route("v2", 50), Route("v3", 10))
    # Pinned: by default the canary is the smallest route, which is now v3.
    assert advanced.guard == {"canary": "v2", "baseline": "v1"}


def test_the_step_to_100_promotes_the_canary() -> None:
    promoted = next_rollout(ROLLOUT, SPEC, Verdict("advance", "ok", next_weight=100))

    assert promoted is not None
    assert promoted.routes == (Route("v2", 100),) and promoted.fallback == "v2"
    assert promoted.guard is None and promoted.sticky_key == "user"


def test_hold_changes_nothing() -> None:
    assert next_rollout(ROLLOUT, SPEC, Verdict("hold", "wait")) is None


def test_canary_weight_is_a_share_of_the_routed_weight() -> None:
    assert canary_weight(ROLLOUT, "v2") == pytest.approx(10)
    assert canary_weight(Rollout("iris", (Route("v1", 3), Route("v2", 1))), "v2") == 25
    assert canary_weight(Rollout("iris", ()), "v2") == 0
