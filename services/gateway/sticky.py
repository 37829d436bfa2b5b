"""Which request headers the gateway forwards as sticky-key candidates: pure functions, no I/O.

The router picks a request's version by hashing the value of its rollout's `sticky_key` (a
request parameter, else a request header). The router's copy of the rollout is the one that
counts, so the gateway must not decide from its own copy, which may lag, whether a header is
worth forwarding: right after a rollout change sets `sticky_key: x-user-id`, a gateway that
has not seen the change yet would forward nothing and the router would hash request ids,
moving users between versions. So the gateway forwards the value of every header that *could*
be a sticky key: the configured names (`INFERMESH_GATEWAY_STICKY_HEADERS`, which should list
every header a rollout may name) and the sticky key of every rollout it knows. The forwarded
values ride in the request's parameters under the lower-cased header name; a parameter the
client set itself wins. The set is bounded (`MAX_STICKY_HEADERS` names, values cut at
`MAX_STICKY_VALUE` characters), so this costs a few header lookups per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

DEFAULT_STICKY_HEADERS = ("x-user-id", "x-session-id")
MAX_STICKY_HEADERS = 8
MAX_STICKY_VALUE = 256


def sticky_header_names(configured: Iterable[str], rollout_keys: Iterable[str]) -> tuple[str, ...]:
    """The lower-cased header names to forward: the configured ones first, then the rollouts'
    sticky keys (sorted, so every gateway replica forwards the same ones), at most
    `MAX_STICKY_HEADERS`."""
    names = dict.fromkeys(name.lower() for name in configured)
    names.update(dict.fromkeys(sorted(key.lower() for key in rollout_keys)))
    return tuple(names)[:MAX_STICKY_HEADERS]


def forward_sticky_headers(
    parameters: dict[str, Any], header: Callable[[str], str | None], names: Iterable[str]
) -> None:
    """Copy the headers in `names` that the request carries into `parameters`, unless the
    request set that parameter itself."""
    for name in names:
        if name not in parameters:
            value = header(name)
            if value is not None:
                parameters[name] = value[:MAX_STICKY_VALUE]

