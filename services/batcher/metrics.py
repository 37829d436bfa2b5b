"""Batcher metrics: batch sizes (the proof that batching happens), queue delay and depth,
rows per tenant (the proof that sharing is fair), rejections."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

DepthSource = Callable[[], Iterable[tuple[str, str, str, int]]]
"""Yields (model, version, lane, queued rows)."""


class BatcherMetrics:
    """One set of batcher metrics in its own registry (one per batcher instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.batch_rows = Histogram(
            "infermesh_batcher_batch_rows", "Rows per dispatched batch",
            ["model", "version"], buckets=ROW_BUCKETS, registry=self.registry,
        )
        self.queue_delay = Histogram(
            "infermesh_batcher_queue_seconds", "Time a request waited in its queue",
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1),
            registry=self.registry,
        )
        self.rejected = Counter(
            "infermesh_batcher_rejected", "Requests rejected because a queue was full",
            ["model", "version"], registry=self.registry,
        )
        self.queue_rejections = Counter(
            "infermesh_batcher_queue_rejections",
            "Requests turned away at a full queue: refused on arrival (full) or dropped to "
            "admit another tenant's or lane's request (evicted)",
            ["model", "reason"], registry=self.registry,
        )
        self._depth = _QueueDepth()
        self._tenant_rows = _TenantRows()
        self.registry.register(self._depth)
        self.registry.register(self._tenant_rows)
        self._rejections: dict[tuple[str, str], Counter] = {}

    def observe_batch(self, model: str, version: str, rows: int) -> None:
        self.batch_rows.labels(model, version).observe(rows)

    def count_tenant_rows(self, model: str, rows_by_tenant: dict[str, int]) -> None:
        """Book one batch's rows to the tenants that sent them."""
        totals = self._tenant_rows.totals
        for tenant, rows in rows_by_tenant.items():
            key = (model, tenant)
            totals[key] = totals.get(key, 0) + rows

    def count_refused(self, model: str, version: str) -> None:
        """A request refused on arrival at a full queue."""
        self.rejected.labels(model, version).inc()
        self._rejection(model, "full").inc()

    def count_evicted(self, model: str, count: int) -> None:
        """Queued requests dropped to make room for a better claim."""
        self._rejection(model, "evicted").inc(count)

    def _rejection(self, model: str, reason: str) -> Counter:
        child = self._rejections.get((model, reason))
        if child is None:
            child = self._rejections[(model, reason)] = self.queue_rejections.labels(model, reason)
        return child

    def watch_queues(self, source: DepthSource) -> None:
        """Report `source`'s queue depths at each scrape (nothing to update per request)."""
        self._depth.sources.append(source)


class _QueueDepth:
    """`infermesh_batcher_queue_rows{model, version, lane}`, read from the queues at scrape."""

    NAME = "infermesh_batcher_queue_rows"
    HELP = "Rows waiting in the batcher's queue"

    def __init__(self) -> None:
        self.sources: list[DepthSource] = []

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["model", "version", "lane"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["model", "version", "lane"])
        for source in self.sources:
            for model, version, lane, rows in source():
                family.add_metric([model, version, lane], rows)
        yield family


class _TenantRows:
    """`infermesh_batcher_rows_total{model, tenant}`: plain sums, read at scrape (the event
    loop both counts and serves /metrics, so no lock is taken per batch)."""

    NAME = "infermesh_batcher_rows"
    HELP = "Rows dispatched in batches, per tenant"

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], int] = {}

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["model", "tenant"])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["model", "tenant"])
        for (model, tenant), rows in list(self.totals.items()):
            family.add_metric([model, tenant], rows)
        yield family
