"""When to dispatch a batch: a pure function of the queue, the worker and the policy.

Work-conserving: a worker with nothing in flight gets whatever is queued at once, so a lone
request at low load never waits for a batch window. While every worker is busy, requests
accumulate; the next batch leaves as soon as it is full or its oldest request has waited
`max_queue_delay`, and is pipelined to the worker so that it starts the moment the running
batch finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.types import BatchingPolicy


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Take up to `rows` rows now, or (rows == 0) look again after `wait` seconds."""

    rows: int
    wait: float | None = None


def plan_batch(
    *, queued_rows: int, oldest_wait: float, worker_idle: bool, policy: BatchingPolicy
) -> Dispatch:
    """Decide for one queue and the least-loaded worker with a free pipeline slot."""
    if queued_rows <= 0:
        return Dispatch(0)
    delay = policy.max_queue_delay_ms / 1000.0
    if worker_idle or queued_rows >= policy.max_batch_size or oldest_wait >= delay:
        return Dispatch(min(queued_rows, policy.max_batch_size))
    return Dispatch(0, wait=delay - oldest_wait)
