from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from control.guard.metrics import VersionFigures, parse_figures, total

# The router's buckets (services/router/metrics.py), in seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10,
)


class RouterMetrics:
    """The two families a router exports, in a registry of their own (one per router)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "infermesh_router_requests_total", "requests", ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "infermesh_router_request_duration_seconds", "latency", ["model", "version"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def serve(self, model: str, version: str, count: int, *, outcome: str = "success",
              seconds: float = 0.002) -> None:
        """Record `count` requests as the router would."""
        self.requests.labels(model, version, outcome).inc(count)
        child = self.duration.labels(model, version)
        for _ in range(count):
            child.observe(seconds)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_parse_counts_outcomes_and_buckets_per_version() -> None:
    router = RouterMetrics()
    router.serve("iris", "1", 7)
    router.serve("iris", "1", 2, outcome="failure", seconds=0.02)
    router.serve("iris", "1", 1, outcome="client_error", seconds=0.0001)
    router.serve("iris", "2", 3, seconds=4.0)
    other = Gauge("infermesh_router_queue_depth", "unrelated", registry=router.registry)
    other.set(5)

    figures = parse_figures(router.text())

    assert set(figures) == {("iris", "1"), ("iris", "2")}
    v1 = figures[("iris", "1")]
    assert (v1.success, v1.failure, v1.client_error) == (7, 2, 1)
    assert v1.samples == 9 and v1.error_rate == pytest.approx(2 / 9)
    buckets = dict(v1.buckets)
    assert buckets[0.0005] == 1 and buckets[0.002] == 8 and buckets[0.02] == 10
    assert buckets[float("inf")] == 10 and v1.buckets == tuple(sorted(v1.buckets))
    assert dict(figures[("iris", "2")].buckets)[3] == 0
    assert dict(figures[("iris", "2")].buckets)[5] == 3


def test_parse_rejects_what_is_not_exposition_text() -> None:
    with pytest.raises(ValueError):
        parse_figures("<html>502 Bad Gateway</html>")


def test_since_is_the_difference_between_two_scrapes() -> None:
    router = RouterMetrics()
    router.serve("iris", "1", 5)
    before = parse_figures(router.text())[("iris", "1")]
    router.serve("iris", "1", 3, outcome="failure", seconds=0.05)
    after = parse_figures(router.text())[("iris", "1")]

    delta = after.since(before)

    assert (delta.success, delta.failure) == (0, 3)
    assert dict(delta.buckets)[0.03] == 0 and dict(delta.buckets)[0.05] == 3


def test_a_counter_going_down_is_a_restart_counted_from_zero() -> None:
    router = RouterMetrics()
    router.serve("iris", "1", 100)
    before = parse_figures(router.text())[("iris", "1")]
    restarted = RouterMetrics()
    restarted.serve("iris", "1", 4, outcome="failure")
    after = parse_figures(restarted.text())[("iris", "1")]

    delta = after.since(before)

    assert (delta.success, delta.failure) == (0, 4)
    assert dict(delta.buckets)[float("inf")] == 4


def test_a_new_created_time_is_a_restart_even_when_counts_grew() -> None:
    buckets = ((0.01, 10.0), (float("inf"), 10.0))
    before = VersionFigures(success=10, buckets=buckets, started=1000.0)
    after = VersionFigures(success=12, buckets=((0.01, 12.0), (float("inf"), 12.0)),
                           started=2000.0)

    assert after.since(before).success == 12
    assert VersionFigures(success=12, buckets=buckets, started=1000.0).since(before).success == 2


def test_total_adds_routers_bucket_by_bucket() -> None:
    a = VersionFigures(success=1, failure=1, buckets=((0.01, 1.0), (float("inf"), 2.0)))
    b = VersionFigures(success=3, buckets=((0.01, 3.0), (float("inf"), 3.0)))

    summed = total([a, b])

    assert (summed.success, summed.failure) == (4, 1)
    assert summed.buckets == ((0.01, 4.0), (float("inf"), 5.0))
    assert total([]) == VersionFigures()
