"""One row of the fault table: what a load saw around one fault, and the JSON it is kept as."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.faults.load import DEADLINE, Outcome

FAST = DEADLINE + 1.0
"""A failure must be answered within this many seconds of sending (the deadline plus a margin
for a busy machine's scheduling)."""


@dataclass
class FaultRow:
    """What happened to the requests sent around one fault."""

    fault: str
    sent: int
    ok: int
    failed: dict[str, int]
    """Failures by status (`503`, `connection`, ...), hangs excluded."""
    hung: int
    slow_failures: int
    """Failures answered later than `FAST`."""
    unclear_failures: int
    """Statuses without a JSON error naming the cause, or 500 (an unexpected error)."""
    lost_log_rows: int
    """Requests answered 200 with no row in `predictions`."""
    seconds_to_recover: float | None
    """From the end of the fault to the answer of the first success sent after the last
    failure (0 if nothing failed; None if nothing succeeded after it)."""
    errors: list[str] = field(default_factory=list)
    """Distinct error texts seen (at most a few), for the report."""


def summarise(
    fault: str, outcomes: list[Outcome], *, fault_end: float, lost_log_rows: int,
) -> FaultRow:
    """The row of `fault` from the outcomes of its load (sorted by send time)."""
    failures = [o for o in outcomes if not o.ok and not o.hung]
    return FaultRow(
        fault=fault, sent=len(outcomes), ok=sum(o.ok for o in outcomes),
        failed=dict(Counter(o.kind for o in failures)),
        hung=sum(o.hung for o in outcomes),
        slow_failures=sum((o.latency or 0.0) > FAST for o in failures),
        unclear_failures=sum(not _clear(o) for o in failures),
        lost_log_rows=lost_log_rows,
        seconds_to_recover=recovery(outcomes, fault_end=fault_end),
        errors=sorted({f"{o.kind}: {o.error}"[:160] for o in failures})[:6],
    )


def recovery(outcomes: list[Outcome], *, fault_end: float) -> float | None:
    """Seconds from `fault_end` to the answer of the first success sent after the last failure
    (0 when nothing failed, None when nothing succeeded after it)."""
    last_failure = max((o.sent for o in outcomes if not o.ok), default=None)
    if last_failure is None:
        return 0.0
    after = [o for o in outcomes if o.ok and o.sent > last_failure]
    if not after:
        return None
    answered = after[0].sent + (after[0].latency or 0.0)
    return round(max(0.0, answered - fault_end), 2)


def steady_since(outcomes: list[Outcome], *, after: float) -> float:
    """Seconds of sending, after `after`, covered by the current unbroken run of successes
    (over the requests answered so far)."""
    done = sorted((o for o in outcomes if o.sent >= after), key=lambda o: o.sent)
    run_start: float | None = None
    for outcome in done:
        if not outcome.ok:
            run_start = None
        elif run_start is None:
            run_start = outcome.sent
    return 0.0 if run_start is None else done[-1].sent - run_start


def _clear(outcome: Outcome) -> bool:
    if outcome.status is None:  # a refused or reset connection: clear to any client
        return True
    return outcome.status != 500 and bool(outcome.error)


def write_table(rows: list[FaultRow], *paths: Path, meta: dict[str, Any]) -> None:
    """`meta` and the rows (under `rows`) as a JSON object at each of `paths`."""
    data = {**meta, "rows": [asdict(row) for row in rows]}
    encoded = orjson.dumps(data, option=orjson.OPT_INDENT_2)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded)
