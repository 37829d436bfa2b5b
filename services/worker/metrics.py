"""Worker metrics: executed batch sizes and compute time per version and device."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.mesh.types import Batch

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class WorkerMetrics:
    """One set of worker metrics in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.batch_rows = Histogram(
            "infermesh_worker_batch_rows", "Rows per executed batch",
            ["model", "version", "device"], buckets=ROW_BUCKETS, registry=self.registry,
        )
        self.compute = Histogram(
            "infermesh_worker_compute_seconds", "Model execution time per batch",
            ["model", "version", "device"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
        )
        self.requests = Counter(
            "infermesh_worker_requests", "Requests executed (members of batches)",
            ["model", "version", "device"], registry=self.registry,
        )

    def observe(self, batch: Batch, device: str, seconds: float) -> None:
        labels = (batch.model, batch.version, device)
        self.batch_rows.labels(*labels).observe(sum(batch.rows))
        self.compute.labels(*labels).observe(seconds)
        self.requests.labels(*labels).inc(len(batch.rows))
