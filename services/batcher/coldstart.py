"""Whether a version with no ready worker is expected to get one: it scales.

A version under the autoscaler (a `scale/{model}/{version}` record exists) or allowed to go to
zero workers (its record's `replicas.min` is 0, or `autoscaling.scale_to_zero` is true) is
without a worker at times by design, and a worker starts when requests come (issue 17: requests
for a version at zero are held, bounded by their deadlines, while one worker starts; never a
4xx/5xx for "not ready"). The batcher holds such a version's requests up to their deadlines
(504 then) instead of refusing them with a 503 after its short no-worker grace. Pure: it reads
the config view only.
"""

from __future__ import annotations

from services.mesh.domain.config import ConfigView


def worker_expected(config: ConfigView, model: str, version: str) -> bool:
    """Whether (model, version) scales, so that a missing worker is one on its way."""
    if config.get(f"scale/{model}/{version}") is not None:
        return True
    record = config.get(f"models/{model}/{version}")
    if not isinstance(record, dict):
        return False
    replicas, autoscaling = record.get("replicas"), record.get("autoscaling")
    return (isinstance(replicas, dict) and replicas.get("min") == 0) or (
        isinstance(autoscaling, dict) and autoscaling.get("scale_to_zero") is True)
