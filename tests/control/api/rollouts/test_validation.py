from __future__ import annotations

from typing import Any

import pytest

from control.api.rollouts.validation import parse_reason, parse_rollout
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import Rollout, Route, ShadowRoute
from tests.control.api.conftest import canary

CURRENT = Rollout.stable("iris", "1")
VERSIONS = {"1", "2", "3"}


def parse(body: dict[str, Any], current: Rollout = CURRENT) -> Rollout:
    """What `RolloutStore.apply` checks before writing."""
    parse_reason(body.get("reason", ""))
    return parse_rollout("iris", body, current=current, versions=VERSIONS)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "routes: required"),
        ({"routes": []}, "routes: must be a non-empty list"),
        ({"routes": [{"version": "1", "weight": 50}, {"version": "9", "weight": 50}]},
         "routes[1].version: version '9' of model 'iris' does not exist"),
        ({"routes": [{"version": "1", "weight": 90}]}, "routes: weights must sum to 100 (got 90)"),
        ({"routes": [{"version": "1", "weight": 50}, {"version": "1", "weight": 50}]},
         "routes[1].version: version '1' is listed twice"),
        ({"routes": [{"version": "1", "weight": 110}, {"version": "2", "weight": -10}]},
         "routes[1].weight: must be >= 0"),
        ({"routes": [{"version": "1", "weight": "100"}]}, "routes[0].weight: must be a number"),
        ({"routes": [{"version": "1", "weight": True}]}, "routes[0].weight: must be a number"),
        ({"routes": [{"version": "1"}]}, "routes[0].weight: required"),
        ({"routes": ["1"]}, "routes[0]: must be an object"),
        ({"routes": [{"version": "1", "weight": 100, "w": 1}]}, "routes[0].w: unknown field"),
        (canary(shadow=[{"version": "3", "fraction": 1.5}]),
         "shadow[0].fraction: must be in [0, 1]"),
        (canary(shadow=[{"version": "9", "fraction": 0.1}]),
         "shadow[0].version: version '9' of model 'iris' does not exist"),
        (canary(shadow={"version": "3"}), "shadow: must be a list"),
        (canary(fallback="9"), "fallback: version '9' of model 'iris' does not exist"),
        (canary(sticky_key=5), "sticky_key: must be a non-empty string or null"),
        (canary(salt=None), "salt: must be a string"),
        (canary(reason=5), "reason: must be a string"),
        (canary(weights=[]), "weights: unknown field"),
        (canary(model="other"), "model: the body names 'other'"),
        (canary(guard="on"), "guard: must be an object"),
        (canary(guard={"canary": "3"}), "guard.canary: version '3' is not one of the routes"),
        (canary(guard={"steps": [50, 10]}), "guard.steps[1]: steps must increase"),
    ],
)
def test_each_invalid_field_is_named(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(body)
    assert caught.value.message.startswith(message)


def test_defaults_come_from_the_current_rollout() -> None:
    current = Rollout("iris", (Route("1", 100),), sticky_key="user", salt="s", epoch=4)
    parsed = parse(canary(30), current)
    assert parsed == Rollout(
        "iris", (Route("1", 70), Route("2", 30)), sticky_key="user", salt="s", fallback="1",
        epoch=5,
    )
    assert parse(canary(30, salt="", sticky_key=None)).salt == ""
    assert parse(canary(30)).salt == "iris"  # the current salt is empty: the model name


def test_explicit_fields_are_kept() -> None:
    body = canary(60, shadow=[{"version": "3", "fraction": 0.25}], fallback="3", salt="x")
    parsed = parse(body)
    assert parsed.shadow == (ShadowRoute("3", 0.25),)
    assert (parsed.fallback, parsed.salt) == ("3", "x")
    assert parse(canary(60)).fallback == "2"  # the largest weight


def test_weights_within_a_rounding_error_of_100_are_accepted() -> None:
    thirds = [{"version": v, "weight": 100 / 3} for v in ("1", "2", "3")]
    assert len(parse({"routes": thirds}).routes) == 3
