"""Router metrics: outcomes and latency per served version, fallbacks, shadow mirrors.

The names and labels are a contract: the rollout guard scrapes every router's `/metrics` and
compares a canary's outcomes and latency with its baseline's. Label children are looked up once
per (model, version) and cached, so a request costs a dict lookup rather than `.labels()`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.mesh.domain.errors import InvalidInput, NotFound
from services.mesh.infra.instruments import deadline_exceeded

SUCCESS, FAILURE, CLIENT_ERROR, DROPPED = "success", "failure", "client_error", "dropped"
UNKNOWN = "_unknown"
"""Model and version label of a request naming a model or version the router does not know
(client-chosen names must not grow the metrics without bound)."""
UNROUTED = "_unrouted"
"""Version label of a request that failed before a version was chosen."""
NO_ROUTE = "_none"
"""`routed` label of a fallback taken because no route had weight."""

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10,
)
DIFF_BUCKETS = (
    1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10,
)


def outcome_of(error: BaseException) -> str:
    """`client_error` for what the caller got wrong, `failure` for anything else."""
    return CLIENT_ERROR if isinstance(error, InvalidInput | NotFound) else FAILURE


class VersionStats:
    """The label children of one (model, version) for primary requests."""

    __slots__ = ("_client_error", "_duration", "_failure", "_success")

    def __init__(self, metrics: RouterMetrics, model: str, version: str) -> None:
        self._success = metrics.requests.labels(model, version, SUCCESS)
        self._failure = metrics.requests.labels(model, version, FAILURE)
        self._client_error = metrics.requests.labels(model, version, CLIENT_ERROR)
        self._duration = metrics.duration.labels(model, version)

    def succeeded(self, seconds: float) -> None:
        self._success.inc()
        self._duration.observe(seconds)

    def failed(self, error: BaseException, seconds: float) -> None:
        outcome = outcome_of(error)
        (self._failure if outcome == FAILURE else self._client_error).inc()
        self._duration.observe(seconds)


class ShadowStats:
    """The label children of one (model, shadow version) for mirrored requests."""

    __slots__ = ("dropped", "failure", "success")

    def __init__(self, metrics: RouterMetrics, model: str, version: str) -> None:
        self.success = metrics.shadow_requests.labels(model, version, SUCCESS)
        self.failure = metrics.shadow_requests.labels(model, version, FAILURE)
        self.dropped = metrics.shadow_requests.labels(model, version, DROPPED)


class ComparisonStats:
    """The label children of one (model, primary version, shadow version) comparison."""

    __slots__ = ("agreements", "comparisons", "mean_abs_diff")

    def __init__(self, metrics: RouterMetrics, model: str, primary: str, shadow: str) -> None:
        self.comparisons = metrics.comparisons.labels(model, primary, shadow)
        self.agreements = metrics.agreements.labels(model, primary, shadow)
        self.mean_abs_diff = metrics.mean_abs_diff.labels(model, primary, shadow)


class RouterMetrics:
    """One set of router metrics in its own registry (one per router instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._versions: dict[tuple[str, str], VersionStats] = {}
        self._fallbacks: dict[tuple[str, str, str], Counter] = {}
        self._shadows: dict[tuple[str, str], ShadowStats] = {}
        self._comparisons: dict[tuple[str, str, str], ComparisonStats] = {}
        self._register_primary()
        self._register_shadow()

    def _register_primary(self) -> None:
        self.requests = Counter(
            "infermesh_router_requests_total", "Primary requests by served version and outcome",
            ["model", "version", "outcome"], registry=self.registry,
        )
        self.duration = Histogram(
            "infermesh_router_request_duration_seconds",
            "Time from router receipt to response, primary requests",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.deadline_exceeded = deadline_exceeded(self.registry, "router")
        self.fallbacks = Counter(
            "infermesh_router_fallback_total",
            "Requests served by the fallback because the routed version had no ready worker",
            ["model", "routed", "served"], registry=self.registry,
        )

    def _register_shadow(self) -> None:
        self.shadow_requests = Counter(
            "infermesh_shadow_requests_total", "Mirrored requests by shadow version and outcome",
            ["model", "version", "outcome"], registry=self.registry,
        )
        self.comparisons = Counter(
            "infermesh_shadow_comparisons_total", "Output rows compared, primary vs shadow",
            ["model", "primary", "shadow"], registry=self.registry,
        )
        self.agreements = Counter(
            "infermesh_shadow_argmax_agreements_total",
            "Compared rows whose argmax over the last axis agrees",
            ["model", "primary", "shadow"], registry=self.registry,
        )
        self.mean_abs_diff = Histogram(
            "infermesh_shadow_mean_abs_diff",
            "Mean absolute difference of the compared output, one per compared request",
            ["model", "primary", "shadow"], buckets=DIFF_BUCKETS, registry=self.registry,
        )

    def version(self, model: str, version: str) -> VersionStats:
        """The cached children of (model, version)."""
        stats = self._versions.get((model, version))
        if stats is None:
            stats = self._versions[(model, version)] = VersionStats(self, model, version)
        return stats

    def unrouted(self, model: str, error: BaseException, seconds: float) -> None:
        """Count a request that failed before a version was chosen."""
        if isinstance(error, NotFound):
            model = UNKNOWN
        self.version(model, UNKNOWN if model == UNKNOWN else UNROUTED).failed(error, seconds)

    def fallback(self, model: str, routed: str | None, served: str) -> None:
        key = (model, routed or NO_ROUTE, served)
        child = self._fallbacks.get(key)
        if child is None:
            child = self._fallbacks[key] = self.fallbacks.labels(*key)
        child.inc()

    def shadow(self, model: str, version: str) -> ShadowStats:
        """The cached children of (model, shadow version)."""
        stats = self._shadows.get((model, version))
        if stats is None:
            stats = self._shadows[(model, version)] = ShadowStats(self, model, version)
        return stats

    def comparison(self, model: str, primary: str, shadow: str) -> ComparisonStats:
        """The cached children of (model, primary version, shadow version)."""
        key = (model, primary, shadow)
        stats = self._comparisons.get(key)
        if stats is None:
            stats = self._comparisons[key] = ComparisonStats(self, *key)
        return stats


class CacheMetrics:
    """The prediction cache's instruments, named after Triton's response cache
    (`nv_cache_num_hits_per_model`, `nv_cache_num_misses_per_model`) as the
    `infermesh_inference_*` families are after `nv_inference_*`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.hits = Counter(
            "infermesh_cache_num_hits_per_model",
            "Requests answered without an execution of their own: from the cache, or by "
            "joining an identical request in flight", labels, registry=registry,
        )
        self.misses = Counter(
            "infermesh_cache_num_misses_per_model",
            "Requests of a cached version that executed (one per distinct key in flight)",
            labels, registry=registry,
        )
        self.evictions = Counter(
            "infermesh_cache_evictions_total",
            "Entries dropped, by reason (ttl, lru, rollout: the model's config changed)",
            ["model", "reason"], registry=registry,
        )
        self.bytes = Gauge(
            "infermesh_cache_bytes", "Bytes the cache holds (outputs plus a fixed overhead "
            "per entry)", labels, registry=registry,
        )
