"""The gateway's Prometheus metrics, shared by the core and both adapters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.gateway.auth import REASONS
from services.mesh.infra.instruments import deadline_exceeded

UNKNOWN_MODEL = "_unknown"
"""The model label of requests refused before the model was known to exist (401, 403, 404):
their names come from clients, so one label for all keeps a scanner from growing the metric."""


class GatewayMetrics:
    """Every metric of one gateway, in `registry` (served at /metrics)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "infermesh_gateway_requests",
            "Inference requests by model, status code (HTTP status or gRPC code) and protocol",
            ["model", "code", "protocol"], registry=self.registry,
        )
        self.latency = Histogram(
            "infermesh_gateway_request_seconds", "Inference latency at the gateway",
            ["model"], registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
        )
        self.tenant_requests = Counter(
            "infermesh_gateway_tenant_requests",
            "Inference requests of authenticated tenants by outcome: ok, or the error's code "
            "(quota_exceeded, invalid_input, ...), cancelled or error",
            ["tenant", "code"], registry=self.registry,
        )
        self.quota_rejections = Counter(
            "infermesh_gateway_quota_rejections",
            "Requests refused by a quota: rate, concurrency (the tenant's) or model_concurrency",
            ["tenant", "limit"], registry=self.registry,
        )
        self.auth_failures = Counter(
            "infermesh_gateway_auth_failures",
            "Requests refused by authentication or authorization, by reason",
            ["reason"], registry=self.registry,
        )
        for reason in REASONS:
            self.auth_failures.labels(reason)
        self.feedback = Counter(
            "infermesh_feedback",
            "Feedback posts of authenticated tenants by outcome: stored, or the error's code "
            "(invalid_input, unavailable, ...)",
            ["tenant", "outcome"], registry=self.registry,
        )
        self.deadline_exceeded = deadline_exceeded(self.registry, "gateway")
        self.late_responses_avoided = Counter(
            "infermesh_gateway_late_responses_avoided",
            "Answers that came back after their request's deadline and were replaced by a 504 "
            "(no 200 leaves after its deadline)",
            registry=self.registry,
        )
        self.untraced_refusals = Counter(
            "infermesh_gateway_untraced_refusals",
            "Load-shedding answers (503 overloaded, 429 quota, 504 deadline) of unsampled "
            "traces not exported: past the per-process bound on their spans",
            registry=self.registry,
        )
        self.overload_refusals = Counter(
            "infermesh_gateway_overload_refusals",
            "Requests refused at once (503) because answers take longer now than they had "
            "left before their deadline",
            registry=self.registry,
        )
        self.remembered_refusals = Counter(
            "infermesh_gateway_remembered_refusals",
            "Requests refused at once (503) because their batcher refused one of the same "
            "version, tenant and lane due sooner, and its backlog up to their deadline has not "
            "cleared yet: the batcher would refuse them too",
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "infermesh_gateway_loop_lag_seconds",
            "How late the gateway's event loop runs (a decaying maximum): about how long a "
            "request waits before its handler runs",
            registry=self.registry,
        )
        self.jobs_created = Counter(
            "infermesh_gateway_jobs_created", "Async jobs accepted (202) by tenant",
            ["tenant"], registry=self.registry,
        )
        self.jobs_finished = Counter(
            "infermesh_gateway_jobs_finished",
            "Async jobs finished by tenant and status: succeeded, failed or cancelled",
            ["tenant", "status"], registry=self.registry,
        )
        self.job_rows = Counter(
            "infermesh_gateway_job_rows",
            "Rows of async jobs written by this gateway's runner, by status: done or failed",
            ["tenant", "status"], registry=self.registry,
        )
        self.jobs_queued = Gauge(
            "infermesh_gateway_jobs_queued",
            "Async jobs waiting for a runner (all tenants), as of the runner's last poll",
            registry=self.registry,
        )
        # Children by label values: `labels()` costs microseconds a call; a dict lookup does
        # not. Every label here is bounded (models as in UNKNOWN_MODEL, tenants by operators).
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._tenant_children: dict[tuple[str, str], Counter] = {}

    def observe(self, model: str, code: str, *, protocol: str, seconds: float) -> None:
        """Count one finished inference request and its latency."""
        children = self._request_children.get((model, code, protocol))
        if children is None:
            children = (self.requests.labels(model, code, protocol), self.latency.labels(model))
            self._request_children[(model, code, protocol)] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_tenant(self, tenant: str, code: str) -> None:
        """Count one request of an authenticated tenant by outcome."""
        child = self._tenant_children.get((tenant, code))
        if child is None:
            child = self._tenant_children[(tenant, code)] = self.tenant_requests.labels(
                tenant, code
            )
        child.inc()
