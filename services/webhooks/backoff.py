"""When to try a failed delivery again: a pure policy over the attempt number.

The spec's suggested schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: eight attempts over
about 28 hours) with full jitter (a uniform draw between 0 and the step, AWS's "full jitter"),
so receivers coming back from an outage are not hit by every sender at the same instant. A
`Retry-After` from the receiver is a floor on the wait, capped so a receiver cannot park a
delivery for days.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
"""Seconds before retry n (1-based) after the first attempt; 1 + len(schedule) attempts."""
MAX_RETRY_AFTER = 86_400.0
"""The longest a Retry-After may push a retry out (one day)."""


def next_delay(
    attempt: int, schedule: Sequence[float], *, retry_after: float | None,
    rand: Callable[[], float],
) -> float | None:
    """Seconds to wait after attempt `attempt` (1-based) failed, or None when it was the last.
    `rand` draws from [0, 1)."""
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * rand()
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date); None when it is
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def utc(seconds: float) -> datetime:
    """A clock reading as the aware datetime Postgres columns take."""
    return datetime.fromtimestamp(seconds, UTC)
