"""Worker metrics: executed batch sizes and compute time per version and device.

`infermesh_inference_compute_infer_duration_seconds` mirrors Triton's
`nv_inference_compute_infer_duration_us` (in seconds, as a histogram); it is observed with the
same value as `infermesh_worker_compute_seconds`, labelled like the batcher's
`infermesh_inference_*` families (model, version) so the two join on a dashboard.

Placement (docs/PLACEMENT.md): `infermesh_worker_model_loads_total`, `..._load_seconds`,
`..._evictions_total`, `..._thrashes_total`, and resident bytes per version and in total
against `infermesh_worker_memory_budget_bytes` (Triton's `nv_model_*` load metrics are the
nearest kin; it has no memory budget).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.mesh.domain.types import Batch
from services.mesh.infra.instruments import deadline_exceeded

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
COMPUTE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class _VersionChildren:
    """The label children of one (model, version, device), looked up once."""

    __slots__ = ("batch_rows", "compute", "compute_infer", "requests", "rows")

    def __init__(self, metrics: WorkerMetrics, model: str, version: str, device: str) -> None:
        self.batch_rows = metrics.batch_rows.labels(model, version, device)
        self.compute = metrics.compute.labels(model, version, device)
        self.requests = metrics.requests.labels(model, version, device)
        self.rows = metrics.rows.labels(model, version, device)
        self.compute_infer = metrics.compute_infer.labels(model, version)


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
            buckets=COMPUTE_BUCKETS,
        )
        self.requests = Counter(
            "infermesh_worker_requests", "Requests executed (members of batches)",
            ["model", "version", "device"], registry=self.registry,
        )
        self.rows = Counter(
            "infermesh_worker_rows", "Rows executed (Triton's nv_inference_count)",
            ["model", "version", "device"], registry=self.registry,
        )
        self.batches_expired = Counter(
            "infermesh_worker_batches_expired",
            "Batches dropped unrun because every member's deadline passed before they started",
            ["model", "version"], registry=self.registry,
        )
        self.deadline_exceeded = deadline_exceeded(self.registry, "worker")
        self.compute_infer = Histogram(
            "infermesh_inference_compute_infer_duration_seconds",
            "Time in the model's forward per batch (nv_inference_compute_infer_duration_us)",
            ["model", "version"], registry=self.registry, buckets=COMPUTE_BUCKETS,
        )
        self.device_fallbacks = Counter(
            "infermesh_worker_device_fallbacks",
            "Versions moved from CUDA to CPU (cpu_fallback) by a CUDA failure, by its kind",
            ["model", "version", "reason"], registry=self.registry,
        )
        self.device_in_use = Gauge(
            "infermesh_worker_device",
            "1 on the device each loaded version runs on (cpu after a fallback), else 0",
            ["model", "version", "device"], registry=self.registry,
        )
        self.placement = _PlacementMetrics(self.registry)
        self._children: dict[tuple[str, str, str], _VersionChildren] = {}
        self._devices: dict[tuple[str, str], str] = {}

    def observe(self, batch: Batch, device: str, seconds: float) -> None:
        key = (batch.model, batch.version, device)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _VersionChildren(self, *key)
        children.batch_rows.observe(sum(batch.rows))
        children.compute.observe(seconds)
        children.compute_infer.observe(seconds)
        children.requests.inc(len(batch.rows))
        children.rows.inc(sum(batch.rows))

    def fell_back(self, model: str, version: str, reason: str) -> None:
        """Count a move of (model, version) to CPU; `reason` is the failure's kind."""
        self.device_fallbacks.labels(model, version, reason).inc()

    def serving_on(self, model: str, version: str, device: str | None) -> None:
        """(model, version) now runs on `device` (None: unloaded)."""
        previous = self._devices.pop((model, version), None)
        if previous is not None:
            self.device_in_use.labels(model, version, previous).set(0)
        if device is not None:
            self._devices[(model, version)] = device
            self.device_in_use.labels(model, version, device).set(1)

    def expired(self, batch: Batch) -> None:
        """Count a batch dropped unrun, and its members, as deadline misses."""
        self.batches_expired.labels(batch.model, batch.version).inc()
        self.deadline_exceeded.inc(len(batch.rows))


class _PlacementMetrics:
    """Loads, evictions and thrashes of versions, and resident bytes against the budget."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.loads = Counter("infermesh_worker_model_loads",
                             "Versions loaded (at start, or on a batch for a version not loaded)",
                             labels, registry=registry)
        self.load_seconds = Histogram(
            "infermesh_worker_model_load_seconds", "Seconds a load took: fetch, load, warm-up",
            labels, registry=registry, buckets=LOAD_BUCKETS,
        )
        self.evictions = Counter("infermesh_worker_model_evictions",
                                 "Versions unloaded to make room for another", labels,
                                 registry=registry)
        self.thrashes = Counter(
            "infermesh_worker_model_thrashes",
            "Requests for a version evicted less than thrash_window seconds before", labels,
            registry=registry,
        )
        self.version_bytes = Gauge("infermesh_worker_model_resident_bytes",
                                   "Bytes a loaded version holds (measured after its load)",
                                   labels, registry=registry)
        self.resident_bytes = Gauge("infermesh_worker_resident_bytes",
                                    "Bytes all loaded versions hold together", registry=registry)
        self.budget_bytes = Gauge("infermesh_worker_memory_budget_bytes",
                                  "The worker's memory budget (memory_budget_bytes)",
                                  registry=registry)

    def loaded(self, model: str, version: str, *, footprint: int, seconds: float,
               total: int) -> None:
        self.loads.labels(model, version).inc()
        self.load_seconds.labels(model, version).observe(seconds)
        self.version_bytes.labels(model, version).set(footprint)
        self.resident_bytes.set(total)

    def unloaded(self, model: str, version: str, *, total: int, evicted: bool) -> None:
        if evicted:
            self.evictions.labels(model, version).inc()
        self.version_bytes.labels(model, version).set(0)
        self.resident_bytes.set(total)

    def thrashed(self, model: str, version: str) -> None:
        self.thrashes.labels(model, version).inc()
