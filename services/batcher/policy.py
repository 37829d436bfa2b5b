"""When to dispatch a batch: a pure function of the queue, the worker and the policy.

Work-conserving: a worker with nothing in flight gets whatever is queued at once, so a lone
request at low load never waits for a batch window. While the worker is busy, requests
accumulate and the next batch is pipelined to it (so it starts the moment the running batch
ends) once the running batch is expected to end within the pipeline lead (`max_queue_delay`,
at least `MIN_LEAD`) and the batch is full or its oldest request has waited `max_queue_delay`.
Sending a batch earlier would only park it in the worker's queue while requests that could
have joined it keep arriving: for a model whose batches take far longer than the window (the
encoder) a partial batch sent early halved the batch; a full one sent early fixed its members
for the whole running batch, so a tight-deadline request arriving meanwhile queued behind it
instead of in it (earliest deadline first within a tenant can only order what is still
queued), and admission refused the 1 s class of an encoder burst almost entirely. For a model
whose batches end within the lead (the mlp) a full batch still goes at once.

Realtime work never waits for the window behind bulk work: while the worker runs only bulk
batches (a job's packs), queued realtime requests are pipelined to it at once (`behind_bulk`),
to start the moment the bulk batch ends, as an idle worker would take them. The window gathers
realtime rows behind realtime batches; behind a job's pack it only added up to
`max_queue_delay` to the realtime requests that met one (docs/PERFORMANCE.md, issue 19).

With a latency model (`predict`: rows → seconds) and the earliest deadline among the queued
(`slack`, seconds from now), two rules bend the window (issue 14):

- early dispatch: a busy worker stops waiting for a fuller batch once waiting longer would make
  the earliest deadline miss (the batch would start after `slack - predict(rows)`);
- sizing: a batch takes the largest size whose predicted execution, from when it would start,
  still meets that deadline (none does: the full size, the earliest is lost either way); a
  batch that cannot be full is rounded down to the largest preferred size (Triton's rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.mesh.domain.types import BatchingPolicy

MIN_RECHECK = 0.0005
MAX_RETRY_AFTER = 60.0
MIN_LEAD = 0.005
"""Seconds before the running batch's expected end by which the next batch is sent, at least:
the link hop to the worker and its decoding, with room for a busy machine's scheduling. The
worker idles only when a batch ends earlier than predicted by more than this (and then only
until its answer reaches the batcher, which looks at the queue again at once)."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Take up to `rows` rows now, or (rows == 0) look again after `wait` seconds."""

    rows: int
    wait: float | None = None


Predictor = Callable[[int], float | None]
"""Predicted execution seconds of a batch of n rows (None: unknown)."""


def plan_batch(
    *, queued_rows: int, oldest_wait: float, worker_idle: bool, policy: BatchingPolicy,
    free_in: float = 0.0, slack: float | None = None, predict: Predictor | None = None,
    behind_bulk: bool = False,
) -> Dispatch:
    """Decide for one queue and the least-loaded worker with a free pipeline slot.

    `free_in` is the expected time (seconds) until the worker's running batch finishes;
    `slack` the seconds until the earliest deadline queued (None: none). `behind_bulk`: the
    worker runs only bulk batches and realtime requests are queued.
    """
    if queued_rows <= 0:
        return Dispatch(0)
    take = min(queued_rows, policy.max_batch_size)
    start = 0.0 if worker_idle else free_in
    delay = policy.max_queue_delay_ms / 1000.0
    if queued_rows >= policy.max_batch_size and not (worker_idle or behind_bulk):
        lead = max(delay, MIN_LEAD)
        if free_in > lead:  # full, but the running batch is far from its end: stay open
            return Dispatch(0, wait=free_in - lead)
    if worker_idle or behind_bulk or queued_rows >= policy.max_batch_size:
        return Dispatch(size_batch(take, start=start, slack=slack, predict=predict,
                                   policy=policy))
    wait = max(delay - oldest_wait, free_in - delay)
    execution = predict(take) if predict is not None and slack is not None else None
    if execution is not None and slack is not None:
        if max(wait, free_in) + execution > slack:
            wait = 0.0  # early dispatch: waiting longer would miss the earliest deadline
    if (oldest_wait >= delay and free_in <= delay) or wait <= 0.0:
        return Dispatch(size_batch(take, start=start, slack=slack, predict=predict,
                                   policy=policy))
    return Dispatch(0, wait=max(wait, MIN_RECHECK))


def size_batch(
    take: int, *, start: float, slack: float | None, predict: Predictor | None,
    policy: BatchingPolicy,
) -> int:
    """Rows for a batch of at most `take` rows starting `start` seconds from now: the largest
    size that meets the earliest deadline (`slack`), rounded down to a preferred size when
    it cannot be full."""
    rows = take
    if slack is not None and predict is not None:
        rows = _largest_meeting(take, budget=slack - start, predict=predict) or take
    if rows < policy.max_batch_size:
        preferred = [size for size in policy.preferred_batch_sizes if size <= rows]
        if preferred:
            rows = max(preferred)
    return rows


def _largest_meeting(take: int, *, budget: float, predict: Predictor) -> int:
    """The largest n in 1..take with predict(n) <= budget (0: none, or nothing known);
    a binary search, predictions growing with n."""
    low, high = 0, take
    while low < high:
        middle = (low + high + 1) // 2
        seconds = predict(middle)
        if seconds is None:
            return 0
        if seconds <= budget:
            low = middle
        else:
            high = middle - 1
    return low


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
