"""What a goodput run measured, from h2load's per-request logs (pure: no I/O).

Goodput is the number of answers delivered within their deadline per second (Clockwork's
metric, issue 14). A request's deadline is its SLO class's ``timeout`` parameter; its latency
is h2load's, from the send to the end of the response, so it includes the loopback hops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.h2load import Response
from bench.result import Percentiles

OK, REFUSED, EXPIRED = 200, 503, 504


@dataclass(frozen=True)
class Window:
    """The measured interval: requests sent in [start, end), epoch seconds."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Outcome:
    """Counts of what the requests sent in a window got, against their deadline."""

    sent: int = 0
    on_time: int = 0
    """200 within the deadline."""
    late: int = 0
    """200 after the deadline (the scheduler promises none)."""
    refused: int = 0
    """503: refused at admission or by a full queue."""
    expired: int = 0
    """504: the deadline passed before an answer."""
    failed: int = 0
    """Anything else: other statuses, failed streams (-1)."""
    max_late_ms: float = 0.0
    admitted_latencies: list[float] = field(default_factory=list)
    """Seconds, of every answered request that was not refused."""

    def add(self, other: Outcome) -> Outcome:
        """The outcome of both samples together."""
        return Outcome(
            self.sent + other.sent, self.on_time + other.on_time, self.late + other.late,
            self.refused + other.refused, self.expired + other.expired,
            self.failed + other.failed, max(self.max_late_ms, other.max_late_ms),
            self.admitted_latencies + other.admitted_latencies,
        )  # fmt: skip

    @property
    def attainment(self) -> float | None:
        """Share of admitted requests (all but the 503s) answered 200 within the deadline."""
        admitted = self.sent - self.refused
        return self.on_time / admitted if admitted else None

    def share(self, count: int) -> float:
        return count / self.sent if self.sent else 0.0


def tally(responses: Iterable[Response], deadline_s: float, window: Window) -> Outcome:
    """Classify the responses to requests sent inside ``window`` against ``deadline_s``."""
    outcome = Outcome()
    for response in responses:
        if not window.start <= response.start_s < window.end:
            continue
        outcome.sent += 1
        if response.status == REFUSED:
            outcome.refused += 1
            continue
        if response.status >= 0:
            outcome.admitted_latencies.append(response.latency_s)
        if response.status == OK and response.latency_s <= deadline_s:
            outcome.on_time += 1
        elif response.status == OK:
            outcome.late += 1
            late_ms = (response.latency_s - deadline_s) * 1000
            outcome.max_late_ms = max(outcome.max_late_ms, late_ms)
        elif response.status == EXPIRED:
            outcome.expired += 1
        else:
            outcome.failed += 1
    return outcome


def whole_periods(warmup: float, duration: float, period_s: float) -> tuple[float, float]:
    """``warmup`` and ``duration`` (seconds) stretched to whole arrival periods: the warm-up
    up to the next period's start, the duration to the nearest whole number of periods (at
    least one). A window that cuts through periods counts on-phases unevenly: 2 s of warm-up
    and 10 s measured over the encoder's 6 s bursty periods held one on-phase where 10/6 were
    due, and every rate measured in it (offered, goodput) came out at 0.6 of the truth."""
    periods = max(1, round(duration / period_s))
    return math.ceil(warmup / period_s - 1e-9) * period_s, periods * period_s


def window_of(logs: Sequence[Sequence[Response]], *, warmup: float, duration: float) -> Window:
    """From ``warmup`` after the first request of any log, for ``duration`` seconds (whole
    arrival periods of the schedule, see `whole_periods`, for an even count of bursts)."""
    first = min((r.start_s for log in logs for r in log), default=0.0)
    return Window(first + warmup, first + warmup + duration)


@dataclass
class Measurement:
    """One open-loop run: per SLO class (deadline in seconds) its outcome, over one window."""

    pattern: str
    load: float
    """Offered mean rate ÷ the measured capacity (as asked)."""
    mode: str
    round: int
    window_s: float
    classes: dict[float, Outcome]
    client_cpu_s: float = 0.0
    """CPU seconds (user + system) of the h2load processes over the whole run."""
    unanswered: int = 0
    """Requests of the whole run (warm-up included) that h2load gave up on: not in its logs."""

    @property
    def total(self) -> Outcome:
        combined = Outcome()
        for outcome in self.classes.values():
            combined = combined.add(outcome)
        return combined

    @property
    def goodput(self) -> float:
        """200s within their deadline per second."""
        return self.total.on_time / self.window_s if self.window_s else 0.0

    @property
    def offered(self) -> float:
        """Requests actually sent per second in the window."""
        return self.total.sent / self.window_s if self.window_s else 0.0

    @property
    def admitted_latency(self) -> Percentiles:
        return Percentiles.of(self.total.admitted_latencies)

    def to_dict(self) -> dict[str, object]:
        total, latency = self.total, self.admitted_latency
        return {
            "pattern": self.pattern, "load": self.load, "mode": self.mode, "round": self.round,
            "window_s": self.window_s, "offered_rps": self.offered, "goodput_rps": self.goodput,
            "attainment": total.attainment, "refused_share": total.share(total.refused),
            "expired_share": total.share(total.expired), "late_200": total.late,
            "max_late_ms": total.max_late_ms, "failed": total.failed,
            "admitted_p50_ms": _finite(latency.p50), "admitted_p99_ms": _finite(latency.p99),
            "client_cpu_s": self.client_cpu_s, "unanswered": self.unanswered,
            "classes": {f"{deadline:g}s": _counts(o) for deadline, o in self.classes.items()},
        }  # fmt: skip


def _counts(outcome: Outcome) -> dict[str, object]:
    return {"sent": outcome.sent, "on_time": outcome.on_time, "late": outcome.late,
            "refused": outcome.refused, "expired": outcome.expired, "failed": outcome.failed,
            "attainment": outcome.attainment}  # fmt: skip


def _finite(value: float) -> float | None:
    return None if value != value else round(value, 3)
