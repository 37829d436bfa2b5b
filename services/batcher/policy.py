"""When to dispatch a batch: a pure function of the queue, the worker and the policy.

Work-conserving: a worker with nothing in flight gets whatever is queued at once, so a lone
request at low load never waits for a batch window. While the worker is busy, requests
accumulate and the next batch is pipelined to it (so it starts the moment the running batch
ends) as soon as it is full, or once its oldest request has waited `max_queue_delay` *and* the
running batch is expected to finish within that window. Sending a partial batch earlier would
only park it in the worker's queue while requests that could have joined it keep arriving:
for a model whose batches take far longer than the window (the encoder) that halves the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.domain.types import BatchingPolicy

MIN_RECHECK = 0.0005
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Take up to `rows` rows now, or (rows == 0) look again after `wait` seconds."""

    rows: int
    wait: float | None = None


def plan_batch(
    *, queued_rows: int, oldest_wait: float, worker_idle: bool, policy: BatchingPolicy,
    free_in: float = 0.0,
) -> Dispatch:
    """Decide for one queue and the least-loaded worker with a free pipeline slot.

    `free_in` is the expected time (seconds) until the worker's running batch finishes.
    """
    if queued_rows <= 0:
        return Dispatch(0)
    take = min(queued_rows, policy.max_batch_size)
    if worker_idle or queued_rows >= policy.max_batch_size:
        return Dispatch(take)
    delay = policy.max_queue_delay_ms / 1000.0
    if oldest_wait >= delay and free_in <= delay:
        return Dispatch(take)
    wait = max(delay - oldest_wait, free_in - delay)
    return Dispatch(0, wait=max(wait, MIN_RECHECK))


def drain_seconds(
    *, queued_rows: int, batch_seconds: float, max_batch_size: int, workers: int,
    unknown: float = 1.0,
) -> float:
    """How long the ready workers need to work off `queued_rows`: the Retry-After of a full queue.

    `batch_seconds` is the moving average of one batch's time; `unknown` is the answer before
    any batch has been timed.
    """
    if batch_seconds <= 0.0:
        return unknown
    rows_per_second = max(workers, 1) * max_batch_size / batch_seconds
    return min(max(queued_rows / rows_per_second, MIN_RECHECK), MAX_RETRY_AFTER)
