"""The bounded set of headers the gateway forwards as sticky-key candidates."""

from __future__ import annotations

from typing import Any

from services.gateway.sticky import (
    MAX_STICKY_HEADERS,
    forward_sticky_headers,
    sticky_header_names,
)


def test_configured_names_come_first_then_every_rollouts_key_lower_cased_and_bounded() -> None:
    assert sticky_header_names(("X-User-Id",), {"user", "X-User-Id", "b"}) == (
        "x-user-id", "b", "user"
    )
    many = sticky_header_names((), {f"k{i:02}" for i in range(20)})
    assert many == tuple(f"k{i:02}" for i in range(MAX_STICKY_HEADERS))


def test_a_parameter_the_request_set_wins_over_the_header() -> None:
    parameters: dict[str, Any] = {"x-user-id": "param"}
    headers = {"x-user-id": "header", "x-session-id": "s"}
    forward_sticky_headers(parameters, headers.get, ("x-user-id", "x-session-id", "x-none"))
    assert parameters == {"x-user-id": "param", "x-session-id": "s"}
