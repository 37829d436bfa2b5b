"""The dispatcher's Prometheus metrics, in the registry of the process it runs in (the
gateway's, so they are served at the gateway's /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

OUTCOMES = ("delivered", "retried", "gone", "failed")


class WebhookMetrics:
    """Deliveries by outcome and the latency of each attempt."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.deliveries = Counter(
            "infermesh_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered (2xx), retried (another attempt "
            "is scheduled), gone (410, or the URL disabled by one), failed (no retry left, or "
            "the target refused)",
            ["outcome"], registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.deliveries.labels(outcome)
        self.attempt_seconds = Histogram(
            "infermesh_webhook_attempt_seconds",
            "Time of one delivery attempt: the target check, the POST and its answer",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
