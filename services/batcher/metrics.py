"""Batcher metrics: batch sizes (the proof that batching happens), queue delay and depth,
rows per tenant (the proof that sharing is fair), rejections.

The `infermesh_inference_*` families mirror Triton's `nv_inference_*` (in seconds, not µs), so
dashboards built for Triton read the batcher the same way: `count / exec_count` is the average
batch size. Their label children are cached per (model, version) in a `VersionMetrics`, which
the core keeps on each queue: the hot path never calls `.labels()`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

DepthSource = Callable[[], Iterable[tuple[str, str, str, int]]]
"""Yields (model, version, lane, queued rows)."""

PendingSource = Callable[[], Iterable[tuple[str, str, int]]]
"""Yields (model, version, requests queued or in flight)."""

LoadSource = Callable[[], Iterable[tuple[str, str, int, float | None]]]
"""Yields (model, version, rows in batches on workers, the admission model's predicted wait of
a row arriving now in seconds: `admission.Backlog.clears_in()`, None while nothing is known)."""

ERROR_BUCKETS = (-0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)

QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 2.5, 5)


class VersionMetrics:
    """The label children of one (model, version), looked up once and kept by the core."""

    __slots__ = ("_failure", "_labels", "_misses", "_refusals", "batch_rows", "exec_count",
                 "exec_seconds", "goodput", "inference_count", "prediction_error",
                 "queue_duration", "splits", "success")

    def __init__(self, metrics: BatcherMetrics, model: str, version: str) -> None:
        self.batch_rows = metrics.batch_rows.labels(model, version)
        self.success = metrics.request_success.labels(model, version)
        self.inference_count = metrics.inference_count.labels(model, version)
        self.exec_count = metrics.exec_count.labels(model, version)
        self.queue_duration = metrics.queue_duration.labels(model, version)
        self.splits = metrics.batch_splits.labels(model, version)
        self.goodput = metrics.goodput.labels(model, version)
        self.exec_seconds = metrics.exec_seconds.labels(model, version)
        self.prediction_error = metrics.prediction_error.labels(model, version)
        self._failure: dict[str, Counter] = {}
        self._refusals: dict[str, Counter] = {}
        self._misses: dict[str, Counter] = {}
        self._labels = (metrics, model, version)

    def failed(self, reason: str) -> None:
        """One request answered with an error; `reason` is its `InfermeshError.code`."""
        child = self._failure.get(reason)
        if child is None:
            metrics, model, version = self._labels
            child = self._failure[reason] = metrics.request_failure.labels(model, version, reason)
        child.inc()

    def refused(self, reason: str) -> None:
        """One request refused on arrival: `queue_full`, `deadline_unmeetable` or
        `displaces_admitted`."""
        child = self._refusals.get(reason)
        if child is None:
            metrics, model, version = self._labels
            child = self._refusals[reason] = metrics.admissions_refused.labels(
                model, version, reason)
        child.inc()

    def missed(self, where: str, count: int = 1) -> None:
        """Requests that missed their deadline at the batcher: expired on `arrival`, dropped
        at `take`, not re-run after a worker died (`redispatch`), or answered `late`."""
        child = self._misses.get(where)
        if child is None:
            metrics, model, version = self._labels
            child = self._misses[where] = metrics.deadline_misses.labels(model, version, where)
        child.inc(count)

    def timed(self, predicted: float | None, actual: float) -> None:
        """One batch's execution time, and the latency model's prediction of it."""
        self.exec_seconds.observe(actual)
        if predicted is not None and predicted > 0:
            self.prediction_error.observe((actual - predicted) / predicted)

    def executed(self, rows: int) -> None:
        """One batch of `rows` inferences came back from a worker."""
        self.exec_count.inc()
        self.inference_count.inc(rows)


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
        # Triton-mirrored (nv_inference_*), per (model, version).
        self.request_success = Counter(
            "infermesh_inference_request_success",
            "Requests the batcher answered with a result (nv_inference_request_success)",
            ["model", "version"], registry=self.registry,
        )
        self.request_failure = Counter(
            "infermesh_inference_request_failure",
            "Requests the batcher answered with an error, by error code "
            "(nv_inference_request_failure)",
            ["model", "version", "reason"], registry=self.registry,
        )
        self.inference_count = Counter(
            "infermesh_inference_count",
            "Inferences (rows) in batches a worker executed (nv_inference_count)",
            ["model", "version"], registry=self.registry,
        )
        self.exec_count = Counter(
            "infermesh_inference_exec_count",
            "Batches a worker executed (nv_inference_exec_count)",
            ["model", "version"], registry=self.registry,
        )
        self.queue_duration = Histogram(
            "infermesh_inference_queue_duration_seconds",
            "Time from a request's arrival to its first dispatch in a batch "
            "(nv_inference_queue_duration_us)",
            ["model", "version"], buckets=QUEUE_BUCKETS, registry=self.registry,
        )
        self.batch_splits = Counter(
            "infermesh_batcher_batch_splits",
            "Failed batches split in halves and re-run to find the requests the model rejects "
            "(a batch of n requests splits at most n - 1 times)",
            ["model", "version"], registry=self.registry,
        )
        self.admissions_refused = Counter(
            "infermesh_batcher_admissions_refused",
            "Requests refused on arrival, by reason: queue_full, deadline_unmeetable "
            "(the latency model predicts completion after the deadline), or "
            "displaces_admitted (running ahead of an admitted request, it would make that "
            "one late)",
            ["model", "version", "reason"], registry=self.registry,
        )
        self.deadline_misses = Counter(
            "infermesh_batcher_deadline_misses",
            "Requests that missed their deadline at the batcher: expired on arrival (arrival), "
            "dropped when taken for a batch (take), not re-run after their worker died "
            "(redispatch), answered late (late)",
            ["model", "version", "where"], registry=self.registry,
        )
        self.goodput = Counter(
            "infermesh_batcher_goodput",
            "Responses the batcher delivered before their deadline (or with none)",
            ["model", "version"], registry=self.registry,
        )
        self.exec_seconds = Histogram(
            "infermesh_batcher_execution_seconds",
            "Execution time of one batch on its worker (from the end of the worker's previous "
            "batch, so time queued in the worker is left out)",
            ["model", "version"], buckets=QUEUE_BUCKETS, registry=self.registry,
        )
        self.prediction_error = Histogram(
            "infermesh_batcher_prediction_error",
            "The latency model's relative error per batch: (actual - predicted) / predicted",
            ["model", "version"], buckets=ERROR_BUCKETS, registry=self.registry,
        )
        self._depth = _QueueDepth()
        self._tenant_rows = _TenantRows()
        self._pending = _PendingRequests()
        self._load = _VersionLoad()
        self.registry.register(self._depth)
        self.registry.register(self._tenant_rows)
        self.registry.register(self._pending)
        self.registry.register(self._load)
        self._rejections: dict[tuple[str, str], Counter] = {}

    def version(self, model: str, version: str) -> VersionMetrics:
        """The label children of (model, version); the caller keeps them."""
        return VersionMetrics(self, model, version)

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

    def watch_pending(self, source: PendingSource) -> None:
        """Report `source`'s pending request counts at each scrape."""
        self._pending.sources.append(source)

    def watch_load(self, source: LoadSource) -> None:
        """Report `source`'s rows in flight and predicted waits at each scrape (what the
        autoscaler reads, control/autoscaler/inputs.py)."""
        self._load.sources.append(source)


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


class _PendingRequests:
    """`infermesh_inference_pending_request_count{model, version}` (Triton's
    nv_inference_pending_request_count): requests queued or in a batch, read at scrape."""

    NAME = "infermesh_inference_pending_request_count"
    HELP = "Requests queued in the batcher or in a batch on a worker"

    def __init__(self) -> None:
        self.sources: list[PendingSource] = []

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["model", "version"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["model", "version"])
        for source in self.sources:
            for model, version, count in source():
                family.add_metric([model, version], count)
        yield family


class _VersionLoad:
    """Per (model, version), read at scrape: `infermesh_batcher_inflight_rows`, rows in batches
    on workers, and `infermesh_batcher_predicted_wait_seconds`, how long a row arriving now
    would wait for its batch by the admission model (left out while that model knows
    nothing). The autoscaler reads both, so it needs no estimate of rows per request."""

    INFLIGHT = "infermesh_batcher_inflight_rows"
    INFLIGHT_HELP = "Rows in batches dispatched to workers and not yet answered"
    WAIT = "infermesh_batcher_predicted_wait_seconds"
    WAIT_HELP = ("Seconds a row arriving now would wait before its batch runs, by the "
                 "admission latency model (queued rows over the workers' throughput, plus "
                 "the running batches' time left)")

    def __init__(self) -> None:
        self.sources: list[LoadSource] = []

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.INFLIGHT, self.INFLIGHT_HELP, labels=["model", "version"])
        yield GaugeMetricFamily(self.WAIT, self.WAIT_HELP, labels=["model", "version"])

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(self.INFLIGHT, self.INFLIGHT_HELP,
                                     labels=["model", "version"])
        wait = GaugeMetricFamily(self.WAIT, self.WAIT_HELP, labels=["model", "version"])
        for source in self.sources:
            for model, version, rows, predicted in source():
                inflight.add_metric([model, version], rows)
                if predicted is not None:
                    wait.add_metric([model, version], predicted)
        yield inflight
        yield wait


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
