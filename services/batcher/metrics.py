"""Batcher metrics: batch sizes (the proof that batching happens), queue delay, rejections."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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

    def observe_batch(self, model: str, version: str, rows: int) -> None:
        self.batch_rows.labels(model, version).observe(rows)
