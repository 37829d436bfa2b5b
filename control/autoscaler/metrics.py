"""The autoscaler's own metrics, served on the control API's `/metrics`.

- `infermesh_autoscaler_desired_replicas{model, version}`: the latest desired count of each
  autoscaled version (set on every leading tick, so a follower's stay at its last value);
- `infermesh_autoscaler_decisions_total{model, version, direction}`: changes decided,
  direction `up` or `down`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class AutoscalerMetrics:
    """The autoscaler's instruments in `registry` (the control API's)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.desired = Gauge(
            "infermesh_autoscaler_desired_replicas",
            "Replicas the autoscaler wants for a model version",
            ["model", "version"], registry=self.registry,
        )
        self.decisions = Counter(
            "infermesh_autoscaler_decisions",
            "Changes of a model version's desired replicas, by direction (up, down)",
            ["model", "version", "direction"], registry=self.registry,
        )

