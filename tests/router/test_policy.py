"""Version choice as a pure function: deterministic buckets, weights, fallback."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.mesh.domain.errors import Unavailable
from services.mesh.domain.types import Rollout, Route, ShadowRoute
from services.router.policy import (
    BUCKETS,
    bucket_of,
    choose_version,
    route_by_bucket,
    shadow_targets,
)


def canary(*, fallback: str | None = "1", salt: str = "s") -> Rollout:
    return Rollout("m", (Route("1", 90.0), Route("2", 10.0)), salt=salt, fallback=fallback)


def always_ready(version: str) -> bool:
    return True


def test_bucket_of_is_deterministic_and_in_range() -> None:
    assert bucket_of("salt", "user-42") == bucket_of("salt", "user-42")
    assert all(0 <= bucket_of("salt", f"user-{i}") < BUCKETS for i in range(1000))


def test_the_salt_reshuffles_buckets() -> None:
    keys = [f"user-{i}" for i in range(200)]
    assert [bucket_of("a", k) for k in keys] != [bucket_of("b", k) for k in keys]


def test_ninety_ten_split_over_random_sticky_keys() -> None:
    rng = random.Random(1234)
    rollout = canary()
    chosen = Counter(
        choose_version(rollout, f"{rng.getrandbits(64):x}", is_ready=always_ready).version
        for _ in range(10_000)
    )
    assert chosen.keys() == {"1", "2"}
    assert chosen["2"] / 10_000 == pytest.approx(0.10, abs=0.02)


def test_the_same_sticky_key_always_gets_the_same_version() -> None:
    rollout = canary()
    for key in (f"user-{i}" for i in range(500)):
        versions = {choose_version(rollout, key, is_ready=always_ready).version for _ in range(3)}
        assert len(versions) == 1


def test_fallback_takes_the_request_when_the_routed_version_is_not_ready() -> None:
    rollout = Rollout("m", (Route("2", 100.0),), fallback="1")
    choice = choose_version(rollout, "user-1", is_ready=lambda v: v == "1")
    assert (choice.version, choice.fallback) == ("1", True)
    assert choice.bucket == bucket_of(rollout.salt, "user-1")


def test_routed_version_is_used_when_ready() -> None:
    rollout = Rollout("m", (Route("2", 100.0),), fallback="1")
    choice = choose_version(rollout, "user-1", is_ready=always_ready)
    assert (choice.version, choice.fallback) == ("2", False)


def test_nothing_ready_keeps_the_routed_version_for_the_batcher_to_wait_on() -> None:
    rollout = Rollout("m", (Route("2", 100.0),), fallback="1")
    choice = choose_version(rollout, "user-1", is_ready=lambda v: False)
    assert (choice.version, choice.fallback) == ("2", False)


def test_zero_weight_routes_are_never_chosen() -> None:
    rollout = Rollout("m", (Route("0", 0.0), Route("1", 50.0), Route("2", 0.0),
                            Route("3", 50.0), Route("4", 0.0)))
    chosen = {route_by_bucket(rollout, bucket) for bucket in range(BUCKETS)}
    assert chosen == {"1", "3"}


def test_weights_own_consecutive_bucket_ranges() -> None:
    rollout = canary()
    chosen = [str(route_by_bucket(rollout, bucket)) for bucket in range(BUCKETS)]
    assert chosen.count("1") == 9_000
    assert chosen == sorted(chosen)


def test_a_rollout_without_weight_or_fallback_is_unavailable() -> None:
    rollout = Rollout("m", (Route("1", 0.0),))
    with pytest.raises(Unavailable, match="'m'"):
        choose_version(rollout, "user-1", is_ready=always_ready)


def shadowed(fraction: float, *, salt: str = "s") -> Rollout:
    return Rollout("m", (Route("1", 100.0),), salt=salt, shadow=(ShadowRoute("3", fraction),))


def test_a_shadow_fraction_mirrors_that_share_of_request_ids() -> None:
    rollout = shadowed(0.25)
    mirrored = sum(bool(shadow_targets(rollout, f"req-{i}")) for i in range(4000))
    assert mirrored / 4000 == pytest.approx(0.25, abs=0.03)


def test_shadow_choice_is_deterministic_and_salted() -> None:
    ids = [f"req-{i}" for i in range(500)]
    first = [shadow_targets(shadowed(0.5), i) for i in ids]
    assert first == [shadow_targets(shadowed(0.5), i) for i in ids]
    assert first != [shadow_targets(shadowed(0.5, salt="other"), i) for i in ids]


def test_shadow_sampling_is_independent_of_the_routing_bucket() -> None:
    # With the routing salt, the mirrored ids would be exactly the lowest quarter of buckets.
    rollout = shadowed(0.25)
    buckets = [bucket_of(rollout.salt, f"req-{i}") for i in range(4000)
               if shadow_targets(rollout, f"req-{i}")]
    assert sum(b >= BUCKETS // 4 for b in buckets) / len(buckets) == pytest.approx(0.75, abs=0.05)


def test_each_shadow_version_is_sampled_on_its_own() -> None:
    rollout = Rollout("m", (Route("1", 100.0),),
                      shadow=(ShadowRoute("2", 1.0), ShadowRoute("3", 0.0), ShadowRoute("4", 0.5)))
    chosen = Counter(v for i in range(2000) for v in shadow_targets(rollout, f"req-{i}"))
    assert chosen["2"] == 2000 and chosen["3"] == 0
    assert chosen["4"] / 2000 == pytest.approx(0.5, abs=0.04)


def test_a_fallback_names_the_version_it_was_routed_to() -> None:
    rollout = Rollout("m", (Route("2", 100.0),), fallback="1")
    choice = choose_version(rollout, "user-1", is_ready=lambda v: v == "1")
    assert choice.routed == "2"
