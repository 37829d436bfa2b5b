"""Router figures from Prometheus text: per (model, version) request outcomes and latencies.

Each router instance exports two families (see services/router):

- `infermesh_router_requests_total{model, version, outcome}`, outcome one of
  success | failure | client_error;
- `infermesh_router_request_duration_seconds{model, version}`, a histogram.

`parse_figures` turns one scrape into cumulative `VersionFigures`; `VersionFigures.since`
turns two scrapes of the same router into the figures of the time between them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "infermesh_router_requests"
DURATION = "infermesh_router_request_duration_seconds"

VersionKey = tuple[str, str]
"""(model, version)"""

Buckets = tuple[tuple[float, float], ...]
"""Histogram buckets as (upper bound `le`, cumulative count), ascending, ending at +Inf."""


@dataclass(frozen=True, slots=True)
class VersionFigures:
    """Requests one version answered: outcome counts and the latency histogram's buckets."""

    success: float = 0.0
    failure: float = 0.0
    client_error: float = 0.0
    """Requests refused as the caller's fault (bad input, quota): not the version's errors."""
    buckets: Buckets = ()
    started: float | None = None
    """The series' `_created` time; a different one in a later scrape means a restart."""

    @property
    def samples(self) -> float:
        """Requests the version itself answered or failed (client errors left out)."""
        return self.success + self.failure

    @property
    def error_rate(self) -> float | None:
        """failure / (success + failure); None without samples."""
        return self.failure / self.samples if self.samples > 0 else None

    def plus(self, other: VersionFigures) -> VersionFigures:
        """The two figures summed (e.g. two routers)."""
        return VersionFigures(
            self.success + other.success, self.failure + other.failure,
            self.client_error + other.client_error, _add(self.buckets, other.buckets, 1.0),
        )

    def since(self, earlier: VersionFigures) -> VersionFigures:
        """What happened between `earlier` and this scrape of the same router and series.

        A counter that went down, or a new `_created` time, means the router restarted in
        between: everything counted now happened since, so these figures are the delta.
        """
        if self._reset_since(earlier):
            return VersionFigures(self.success, self.failure, self.client_error, self.buckets)
        return VersionFigures(
            self.success - earlier.success, self.failure - earlier.failure,
            self.client_error - earlier.client_error, _add(self.buckets, earlier.buckets, -1.0),
        )

    def _reset_since(self, earlier: VersionFigures) -> bool:
        if None not in (self.started, earlier.started) and self.started != earlier.started:
            return True
        pairs = [(self.success, earlier.success), (self.failure, earlier.failure),
                 (self.client_error, earlier.client_error)]
        pairs += [(_count_at(self.buckets, le), count) for le, count in earlier.buckets]
        return any(now < before for now, before in pairs)


def parse_figures(text: str) -> dict[VersionKey, VersionFigures]:
    """Cumulative figures per (model, version) in one router's exposition text.

    Raises ValueError when the text is not Prometheus exposition format.
    """
    counts: dict[VersionKey, dict[str, float]] = {}
    buckets: dict[VersionKey, dict[float, float]] = {}
    started: dict[VersionKey, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (REQUESTS, DURATION, f"{REQUESTS}_created"):
            continue
        for sample in family.samples:
            key = (sample.labels.get("model", ""), sample.labels.get("version", ""))
            if sample.name == f"{REQUESTS}_total":
                outcomes = counts.setdefault(key, {})
                outcome = sample.labels.get("outcome", "")
                outcomes[outcome] = outcomes.get(outcome, 0.0) + sample.value
            elif sample.name == f"{DURATION}_bucket":
                buckets.setdefault(key, {})[float(sample.labels["le"])] = sample.value
            elif sample.name == f"{REQUESTS}_created":
                started[key] = min(started.get(key, math.inf), sample.value)
    return {
        key: _figures(counts.get(key, {}), buckets.get(key, {}), started.get(key))
        for key in counts.keys() | buckets.keys()
    }


def total(figures: Iterable[VersionFigures]) -> VersionFigures:
    """The sum of many figures (an empty sum is all zeros)."""
    summed = VersionFigures()
    for each in figures:
        summed = summed.plus(each)
    return summed


def _figures(outcomes: dict[str, float], buckets: dict[float, float],
             started: float | None) -> VersionFigures:
    return VersionFigures(
        success=outcomes.get("success", 0.0), failure=outcomes.get("failure", 0.0),
        client_error=outcomes.get("client_error", 0.0),
        buckets=tuple(sorted(buckets.items())), started=started,
    )


def _count_at(buckets: Buckets, le: float) -> float:
    """Cumulative count at bound `le`: that of the largest bound <= le (0 below the first)."""
    count = 0.0
    for bound, cumulative in buckets:
        if bound > le:
            break
        count = cumulative
    return count


def _add(a: Buckets, b: Buckets, sign: float) -> Buckets:
    """a + sign × b, bucket by bucket (bounds missing on one side read from the one below)."""
    bounds = sorted({le for le, _ in a} | {le for le, _ in b})
    return tuple((le, _count_at(a, le) + sign * _count_at(b, le)) for le in bounds)
