"""The prediction log's metrics, and its log lines (rate-limited: a down database or a full
buffer must not flood the log).

    infermesh_prediction_log_written_total         rows committed to Postgres (new rows only)
    infermesh_prediction_log_journaled_total       rows in the journal before their answer left
    infermesh_prediction_log_journal_writes_total  group commits (one write each) of the journal
    infermesh_prediction_log_unjournaled_total{reason}  rows kept in memory only (JOURNAL_MISSES)
    infermesh_prediction_log_spilled_total         rows appended to the spool on local disk
    infermesh_prediction_log_replayed_total        spilled rows written back to Postgres
    infermesh_prediction_log_rows_rejected_total   rows Postgres refused, set aside (rejects)
    infermesh_prediction_log_dropped_total{reason} records lost, by reason (DROP_REASONS)
    infermesh_prediction_log_buffered              records waiting in memory
    infermesh_prediction_log_spool_bytes           bytes of spool (and journal) files on disk
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("services.predlog.log")

DROP_REASONS = ("buffer_full", "spill_full", "spill_error", "rejected", "corrupt", "error",
                "closed")
"""buffer_full: the in-memory buffer was full; spill_full: the spool reached its size bound;
spill_error: the spool could not be written; rejected: a batch failed with an error that is
neither an outage nor a refusal of particular rows (those are set aside and counted in
`rows_rejected_total`), or a spool chunk kept failing; corrupt:
unreadable spool lines; error: a record could not be converted; closed: recorded after close."""
JOURNAL_MISSES = ("spill_full", "spill_error")
"""Why rows were not journaled (kept in memory, lost if the router is killed): spill_full, the
spool reached its size bound; spill_error, the journal could not be written (disk full)."""
WARN_EVERY = 10.0
"""Seconds between two log lines about the same trouble."""


class PredictionLogMetrics:
    """The counters and gauges of one prediction log, in `registry`."""

    def __init__(self, registry: CollectorRegistry, *, buffered: Callable[[], float],
                 spool_bytes: Callable[[], float]) -> None:
        self.registry = registry
        self.written = Counter(
            "infermesh_prediction_log_written_total", "Prediction rows committed to Postgres",
            registry=registry,
        )
        self.journaled = Counter(
            "infermesh_prediction_log_journaled_total",
            "Prediction rows written to the local journal before their answers were sent",
            registry=registry,
        )
        self.journal_writes = Counter(
            "infermesh_prediction_log_journal_writes_total",
            "Group commits of the journal: one write for the predictions of one loop turn",
            registry=registry,
        )
        self._unjournaled = Counter(
            "infermesh_prediction_log_unjournaled_total",
            "Prediction rows answered without reaching the journal (kept in memory), by reason",
            ["reason"], registry=registry,
        )
        self._misses = {reason: self._unjournaled.labels(reason) for reason in JOURNAL_MISSES}
        self.spilled = Counter(
            "infermesh_prediction_log_spilled_total",
            "Prediction rows spilled to local disk while Postgres was unavailable",
            registry=registry,
        )
        self.replayed = Counter(
            "infermesh_prediction_log_replayed_total",
            "Spilled prediction rows written back to Postgres", registry=registry,
        )
        self._rejected = Counter(
            "infermesh_prediction_log_rows_rejected_total",
            "Prediction rows Postgres refused, set aside in the spool's rejected file",
            registry=registry,
        )
        self._dropped = Counter(
            "infermesh_prediction_log_dropped_total", "Prediction records lost, by reason",
            ["reason"], registry=registry,
        )
        self._drops = {reason: self._dropped.labels(reason) for reason in DROP_REASONS}
        Gauge("infermesh_prediction_log_buffered", "Prediction records waiting in memory",
              registry=registry).set_function(buffered)
        Gauge("infermesh_prediction_log_spool_bytes",
              "Bytes of journaled or spilled prediction rows on disk",
              registry=registry).set_function(spool_bytes)
        self._totals: dict[str, int] = {}
        self._warned: dict[str, float] = {}
        self._down = False

    def dropped(self, reason: str, count: int = 1, *, reason_detail: str = "") -> None:
        """Count `count` records lost for `reason`; warn (at most every WARN_EVERY seconds)."""
        if count <= 0:
            return
        self._drops[reason].inc(count)
        self._totals[reason] = self._totals.get(reason, 0) + count
        if self._due(reason):
            detail = f" ({reason_detail})" if reason_detail else ""
            log.warning("prediction log: dropped %d record(s), reason %s%s; %d so far",
                        count, reason, detail, self._totals[reason])

    def unjournaled(self, count: int, reason: str, *, reason_detail: str = "") -> None:
        """Count `count` rows the journal did not take; warn (at most every WARN_EVERY s)."""
        if count <= 0:
            return
        self._misses[reason].inc(count)
        key = f"unjournaled:{reason}"
        self._totals[key] = self._totals.get(key, 0) + count
        if self._due(key):
            detail = f" ({reason_detail})" if reason_detail else ""
            log.warning("prediction log: %d row(s) not journaled, reason %s%s (kept in memory "
                        "until written); %d so far", count, reason, detail, self._totals[key])

    def rejected(self, count: int, error: str) -> None:
        """Count `count` rows Postgres refused; warn (at most every WARN_EVERY seconds)."""
        self._rejected.inc(count)
        self._totals["refused"] = self._totals.get("refused", 0) + count
        if self._due("refused"):
            log.warning("prediction log: Postgres refused %d row(s), set aside (%s); %d so far",
                        count, error, self._totals["refused"])

    def went_down(self, error: BaseException) -> None:
        """Postgres did not answer: rows spill from now on."""
        due = self._due("down")
        if not self._down or due:
            log.warning("prediction log: Postgres unavailable (%r); spilling to disk", error)
        self._down = True

    def came_back(self, spool_bytes: int) -> None:
        """Postgres answered (again): the spool, if any, replays."""
        if self._down or spool_bytes:
            log.info("prediction log: Postgres reachable; %d bytes of spilled rows to replay",
                     spool_bytes)
        self._down = False

    def _due(self, what: str) -> bool:
        now = time.monotonic()
        if now - self._warned.get(what, -WARN_EVERY) < WARN_EVERY:
            return False
        self._warned[what] = now
        return True
