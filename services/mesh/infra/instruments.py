"""Instruments shared by several services, registered once per registry.

In fused mode the gateway, router, batcher and worker share one Prometheus registry; a metric
that more than one of them reports (with a `hop` label) must be created once there and found
again by the others.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

DEADLINE_EXCEEDED = "infermesh_deadline_exceeded"


def deadline_exceeded(registry: CollectorRegistry, hop: str) -> Counter:
    """`infermesh_deadline_exceeded_total{hop}`: requests a hop answered 504 (their deadline
    passed before it could run them); the child of `hop`."""
    # prometheus_client has no public lookup: its registry maps every sample name it owns.
    existing = registry._names_to_collectors.get(f"{DEADLINE_EXCEEDED}_total")
    if existing is None:
        existing = Counter(
            DEADLINE_EXCEEDED,
            "Requests that missed their deadline, by the hop that answered them so (504)",
            ["hop"], registry=registry,
        )
    assert isinstance(existing, Counter)
    return existing.labels(hop)
