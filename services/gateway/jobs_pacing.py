"""How long a job's request slot rests after each request: a duty cycle while realtime
traffic is being served here, nothing while it is not.

A job's rows travel packed, so alone a job runs at several times the closed-loop rate of
single requests (bench.jobs); the CPU it takes is then what realtime requests beside it
wait for at every hop, whatever their lane at the batcher. A slot that rests
`busy × (1 − duty) / duty` after a request of `busy` seconds is in flight at most `duty` of
the time. The share follows the mesh by itself: when realtime load or a heavier model makes
each request of the job slower, its rests grow with it. With no realtime request for
`REALTIME_WINDOW_S` the job has the mesh to itself and does not rest.
"""

from __future__ import annotations

REALTIME_WINDOW_S = 1.0
"""Seconds since the last realtime request after which a job stops resting."""


def rest_after(busy_s: float, *, duty: float, realtime_age_s: float) -> float:
    """Seconds a job's slot rests after a request that took `busy_s`; `duty` in (0, 1]
    (1: never rests), `realtime_age_s` since the last realtime request arrived here."""
    if duty >= 1.0 or realtime_age_s > REALTIME_WINDOW_S or busy_s <= 0.0:
        return 0.0
    return busy_s * (1.0 - duty) / duty
