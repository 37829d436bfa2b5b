"""Version choice as a pure function of the rollout record and the request's sticky value.

The bucket is a salted hash of the sticky value in [0, 10000): the same value lands in the same
bucket on every router replica and after restarts; routes own consecutive bucket ranges in
proportion to their weights. Shadow sampling hashes the request id with a salt of its own per
shadow version, so which requests are mirrored is independent of which version served them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from services.mesh.domain.errors import Unavailable
from services.mesh.domain.types import Rollout

BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class Choice:
    version: str
    bucket: int
    fallback: bool = False
    """True when the routed version had no ready worker and the fallback took the request."""
    routed: str | None = None
    """On a fallback, the version the bucket was routed to (None: no route had weight)."""


def bucket_of(salt: str, sticky_value: str) -> int:
    """Deterministic bucket in [0, BUCKETS) for a sticky value."""
    digest = hashlib.blake2b(f"{salt}\0{sticky_value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def route_by_bucket(rollout: Rollout, bucket: int) -> str | None:
    """The route owning `bucket`, or None when the rollout has no positive weight."""
    total = sum(r.weight for r in rollout.routes if r.weight > 0)
    if total <= 0:
        return None
    point = (bucket + 0.5) / BUCKETS * total
    edge = 0.0
    chosen = None
    for route in rollout.routes:
        if route.weight <= 0:
            continue
        edge += route.weight
        chosen = route.version
        if point < edge:
            break
    return chosen


def choose_version(
    rollout: Rollout, sticky_value: str, *, is_ready: Callable[[str], bool]
) -> Choice:
    """The version for a request; the fallback when the routed version has no ready worker."""
    bucket = bucket_of(rollout.salt, sticky_value)
    routed = route_by_bucket(rollout, bucket)
    if routed is not None and is_ready(routed):
        return Choice(routed, bucket)
    if rollout.fallback is not None and rollout.fallback != routed and is_ready(rollout.fallback):
        return Choice(rollout.fallback, bucket, fallback=True, routed=routed)
    if routed is not None:
        return Choice(routed, bucket)  # nothing ready anywhere: let the batcher wait for one
    raise Unavailable(f"model '{rollout.model}' has no version to route to")


def shadow_targets(rollout: Rollout, request_id: str) -> list[str]:
    """The shadow versions that mirror this request: each `fraction` of request ids, by hash."""
    return [
        shadow.version for shadow in rollout.shadow
        if bucket_of(f"{rollout.salt}\0shadow\0{shadow.version}", request_id)
        < shadow.fraction * BUCKETS
    ]
