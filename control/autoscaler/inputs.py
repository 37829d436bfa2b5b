"""What the autoscaler observes: each model version's load on the batchers, and its workers.

Load comes from every batcher registered under `endpoints/batcher/*`: its `{http}/metrics`
(services/batcher/metrics.py), summed over batchers per (model, version):

- `queue_rows`: the gauge `infermesh_batcher_queue_rows`, all lanes;
- `inflight_rows`: the gauge `infermesh_batcher_inflight_rows` (rows in batches on workers).
  From a batcher that does not export it (an older one), an estimate:
  `infermesh_inference_pending_request_count` (requests queued or in a batch) less the queued
  rows, at least 0, exact when each request carries one row and low otherwise;
- `served_rate`: the rise of `infermesh_inference_count` (rows executed) per second since the
  previous tick; `occupancy`: those rows over (batches executed × the version's
  `max_batch_size`);
- `arrival_rate`: what was served plus the rise of queued and in-flight rows, per second
  (rows are conserved: what arrived was either served or is still waiting), at least 0;
- `wait_p95`: the 95th percentile of `infermesh_inference_queue_duration_seconds` over the
  interval, interpolated inside its bucket as Prometheus' `histogram_quantile` does;
- `predicted_wait`: the gauge `infermesh_batcher_predicted_wait_seconds` (how long a row
  arriving now waits for its batch, by the batcher's admission latency model), the largest over
  the version's batchers (a row may land on any of them); None when no batcher exports it.

A counter that went down (the batcher restarted) counts from zero; a batcher seen for the first
time contributes its gauges but no rates until its next scrape. A failed scrape skips that
batcher for the tick.

Workers come from `endpoints/worker/*`: `ready` counts records that list `model/version` and
are not `draining`; `starting` is max(0, replicas in the current `scale/{model}/{version}`
record − ready): workers asked for but not ready yet (the policy counts them as capacity on its
way, so a slow start does not trigger more starts).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from control.autoscaler.policy import Observation
from services.mesh.domain.config import ConfigView

log = logging.getLogger(__name__)

BATCHERS = "endpoints/batcher/"
WORKERS = "endpoints/worker/"
SCALE = "scale/"

QUEUE_ROWS = "infermesh_batcher_queue_rows"
PENDING = "infermesh_inference_pending_request_count"
INFLIGHT = "infermesh_batcher_inflight_rows"
PREDICTED_WAIT = "infermesh_batcher_predicted_wait_seconds"
ROWS = "infermesh_inference_count_total"
BATCHES = "infermesh_inference_exec_count_total"
WAIT = "infermesh_inference_queue_duration_seconds_bucket"

VersionKey = tuple[str, str]
"""(model, version)"""


@dataclass(slots=True)
class VersionFigures:
    """One (model, version) in one batcher's scrape (cumulative counters, current gauges),
    or the sum or difference of such figures."""

    queue_rows: float = 0.0
    inflight: float = 0.0
    """Rows in batches on workers (exported, or estimated: see the module)."""
    rows: float = 0.0
    batches: float = 0.0
    wait: dict[float, float] = field(default_factory=dict)
    """Queue-wait histogram: upper bound `le` -> cumulative count."""
    predicted_wait: float | None = None

    def since(self, earlier: VersionFigures) -> VersionFigures:
        """Counters' rise since `earlier` (everything, after a restart); gauges as now."""
        restarted = self.rows < earlier.rows or self.batches < earlier.batches or any(
            self.wait.get(le, 0.0) < count for le, count in earlier.wait.items())
        if restarted:
            return self
        return VersionFigures(
            self.queue_rows, self.inflight, self.rows - earlier.rows,
            self.batches - earlier.batches,
            {le: count - earlier.wait.get(le, 0.0) for le, count in self.wait.items()},
            self.predicted_wait,
        )

    def gauges(self) -> VersionFigures:
        """The gauges alone (a series seen for the first time has no interval yet)."""
        return VersionFigures(self.queue_rows, self.inflight, predicted_wait=self.predicted_wait)

    def add(self, other: VersionFigures) -> None:
        self.queue_rows += other.queue_rows
        self.inflight += other.inflight
        if other.predicted_wait is not None:
            self.predicted_wait = max(self.predicted_wait or 0.0, other.predicted_wait)
        self.rows += other.rows
        self.batches += other.batches
        for le, count in other.wait.items():
            self.wait[le] = self.wait.get(le, 0.0) + count


def parse_batcher(text: str) -> dict[VersionKey, VersionFigures]:
    """Figures per (model, version) in one batcher's exposition text (ValueError if not
    Prometheus text)."""
    figures: dict[VersionKey, VersionFigures] = {}
    pending: dict[VersionKey, float] = {}
    exported: set[VersionKey] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in _READ:
                continue
            key = (sample.labels.get("model", ""), sample.labels.get("version", ""))
            each = figures.setdefault(key, VersionFigures())
            if sample.name == QUEUE_ROWS:
                each.queue_rows += sample.value
            elif sample.name == PENDING:
                pending[key] = pending.get(key, 0.0) + sample.value
            elif sample.name == INFLIGHT:
                exported.add(key)
                each.inflight += sample.value
            elif sample.name == PREDICTED_WAIT:
                each.predicted_wait = max(each.predicted_wait or 0.0, sample.value)
            elif sample.name == ROWS:
                each.rows += sample.value
            elif sample.name == BATCHES:
                each.batches += sample.value
            else:
                each.wait[float(sample.labels["le"])] = sample.value
    for key, each in figures.items():
        if key not in exported:
            each.inflight = max(0.0, pending.get(key, 0.0) - each.queue_rows)
    return figures


_READ = frozenset({QUEUE_ROWS, PENDING, INFLIGHT, PREDICTED_WAIT, ROWS, BATCHES, WAIT})


def quantile(q: float, wait: Mapping[float, float]) -> float:
    """The q-quantile of a cumulative histogram (0 when empty), linear inside its bucket; in
    the +Inf bucket, the largest finite bound."""
    bounds = sorted(wait)
    total = wait[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        count = wait[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            share = (rank - below) / (count - below) if count > below else 1.0
            return lower + (le - lower) * share
        lower, below = le, count
    return lower


@dataclass(frozen=True, slots=True)
class Workers:
    ready: int
    starting: int


def workers(config: ConfigView) -> dict[VersionKey, Workers]:
    """Ready and starting workers per (model, version) that has either (see the module)."""
    ready: dict[VersionKey, int] = {}
    for record in config.items(WORKERS).values():
        if not isinstance(record, Mapping) or record.get("draining"):
            continue
        for served in record.get("models") or ():
            model, _, version = str(served).partition("/")
            ready[(model, version)] = ready.get((model, version), 0) + 1
    asked = {key: replicas for key in _scale_keys(config)
             if (replicas := scale_replicas(config, *key)) is not None}
    return {
        key: Workers(ready.get(key, 0), max(0, asked.get(key, 0) - ready.get(key, 0)))
        for key in ready.keys() | asked.keys()
    }


def scale_replicas(config: ConfigView, model: str, version: str) -> int | None:
    """Replicas in the `scale/{model}/{version}` record, None without a readable one."""
    record = config.get(f"{SCALE}{model}/{version}")
    replicas = record.get("replicas") if isinstance(record, Mapping) else None
    return replicas if isinstance(replicas, int) and replicas >= 0 else None


def scale_batchers(config: ConfigView, model: str, version: str) -> int:
    """Batchers in the `scale/{model}/{version}` record (1 without a readable one)."""
    record = config.get(f"{SCALE}{model}/{version}")
    count = record.get("batchers") if isinstance(record, Mapping) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 1 else 1


def _scale_keys(config: ConfigView) -> list[VersionKey]:
    keys = []
    for key in config.items(SCALE):
        model, _, version = key.removeprefix(SCALE).partition("/")
        keys.append((model, version))
    return keys


class LoadReader:
    """Scrapes the batchers once per tick and turns two ticks into rates."""

    def __init__(self, config: ConfigView, session: aiohttp.ClientSession, *,
                 scrape_timeout: float = 0.5) -> None:
        self._config = config
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=scrape_timeout)
        self._last: dict[str, dict[VersionKey, VersionFigures]] = {}
        self._waiting: dict[VersionKey, float] = {}
        self._at: float | None = None

    async def observe(self, now: float, versions: Mapping[VersionKey, int],
                      ) -> dict[VersionKey, Observation]:
        """One observation of each of `versions` (mapped to its max batch size)."""
        summed = await self._scrape_all()
        counts = workers(self._config)
        elapsed = now - self._at if self._at is not None and now > self._at else 0.0
        self._at = now
        observed = {
            key: self._observation(now, key, summed.get(key, VersionFigures()), elapsed,
                                   counts.get(key, Workers(0, 0)), max_batch)
            for key, max_batch in versions.items()
        }
        self._waiting = {key: obs.queue_rows + obs.inflight_rows
                         for key, obs in observed.items()}
        return observed

    def _observation(self, now: float, key: VersionKey, interval: VersionFigures,
                     elapsed: float, each: Workers, max_batch: int) -> Observation:
        inflight = max(0, round(interval.inflight))
        waiting = interval.queue_rows + inflight
        served = interval.rows / elapsed if elapsed else 0.0
        grew = (waiting - self._waiting.get(key, waiting)) / elapsed if elapsed else 0.0
        slots = interval.batches * max_batch
        return Observation(
            at=now, queue_rows=round(interval.queue_rows), inflight_rows=inflight,
            arrival_rate=max(0.0, served + grew), served_rate=served,
            wait_p95=quantile(0.95, interval.wait), predicted_wait=interval.predicted_wait,
            occupancy=min(1.0, interval.rows / slots) if slots > 0 else 0.0,
            ready=each.ready, starting=each.starting,
        )

    async def _scrape_all(self) -> dict[VersionKey, VersionFigures]:
        """The interval's figures per version, summed over the batchers that answered."""
        batchers = {
            str(record.get("instance") or key): str(record["http"])
            for key, record in self._config.items(BATCHERS).items()
            if isinstance(record, Mapping) and record.get("http")
        }
        scrapes = await asyncio.gather(*(self._scrape(name, url)
                                         for name, url in batchers.items()))
        summed: dict[VersionKey, VersionFigures] = {}
        last: dict[str, dict[VersionKey, VersionFigures]] = {}
        for name, scrape in zip(batchers, scrapes, strict=True):
            if scrape is None:
                continue
            last[name] = scrape
            before = self._last.get(name)
            for key, figures in scrape.items():
                interval = _interval(figures, before.get(key) if before is not None else None)
                summed.setdefault(key, VersionFigures()).add(interval)
        self._last = last
        return summed

    async def _scrape(self, name: str, url: str) -> dict[VersionKey, VersionFigures] | None:
        try:
            async with self._session.get(f"{url.rstrip('/')}/metrics",
                                         timeout=self._timeout) as response:
                response.raise_for_status()
                text = await response.text()
            return parse_batcher(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("autoscaler: scraping batcher %s at %s failed (%r); skipped this tick",
                        name, url, exc)
            return None


def _interval(now: VersionFigures, before: VersionFigures | None) -> VersionFigures:
    """What a batcher's series did since its previous scrape; a new series has gauges only."""
    if before is None:
        return now.gauges()
    return now.since(before)


def max_batch_size(record: Mapping[str, Any]) -> int:
    """`batching.max_batch_size` of a `models/` record (32 when unset, as the batcher's)."""
    batching = record.get("batching")
    size = batching.get("max_batch_size", 32) if isinstance(batching, Mapping) else 32
    return size if isinstance(size, int) and size > 0 else 32
