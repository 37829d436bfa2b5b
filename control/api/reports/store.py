"""Model reports: the prediction log joined with feedback, per version and bucket band.

One row per (version, band, shadow) over the predictions of the last `since`:

    band          bucket * buckets / 10000 (integer division): buckets=10 gives 0-999,
                  1000-1999, ...; requests that pinned a version have no bucket and form
                  their own row (`bucket_range` null)
    join          feedback on (tenant, request_id): a tenant's feedback never meets another
                  tenant's prediction, even under the same request id
    accuracy      predictions whose logged label equals the label feedback (of `label_kind`),
                  over those with both (null when none: e.g. the version logs no label)
    mean_score    the mean of score feedback (of `score_kind`)
    latency_ms    percentile_cont 0.5, 0.9, 0.99 over every prediction of the row

Shadow mirrors are left out unless `include_shadow`; their rows carry `shadow: true`. The
query string becomes a `ReportQuery` in validation.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from control.api.reports.validation import ReportQuery
from services.mesh.domain.errors import NotFound
from services.router.policy import BUCKETS

MODEL_EXISTS = "SELECT true FROM models WHERE name = $1"

REPORT = f"""
WITH recent AS (
    SELECT tenant, request_id, version, shadow, latency_ms, label,
           bucket * $3 / {BUCKETS} AS band
    FROM predictions
    WHERE model = $1 AND ts >= now() - $2::interval AND (NOT shadow OR $4)
)
SELECT r.version, r.band, r.shadow,
       count(*) AS predictions,
       count(*) FILTER (WHERE fl.request_id IS NOT NULL OR fs.request_id IS NOT NULL)
           AS with_feedback,
       count(fl.label) AS with_label_feedback,
       count(*) FILTER (WHERE fl.label IS NOT NULL AND r.label IS NOT NULL) AS compared,
       count(*) FILTER (WHERE fl.label = r.label) AS correct,
       count(fs.score) AS with_score_feedback,
       avg(fs.score) AS mean_score,
       percentile_cont(ARRAY[0.5, 0.9, 0.99]::float8[])
           WITHIN GROUP (ORDER BY r.latency_ms) AS latency
FROM recent r
LEFT JOIN feedback fl ON fl.tenant = r.tenant AND fl.request_id = r.request_id
                     AND fl.kind = $5 AND fl.label IS NOT NULL
LEFT JOIN feedback fs ON fs.tenant = r.tenant AND fs.request_id = r.request_id
                     AND fs.kind = $6 AND fs.score IS NOT NULL
GROUP BY r.version, r.band, r.shadow
ORDER BY r.shadow, r.version, r.band NULLS LAST
"""


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One version's predictions in one bucket band (or pinned), and their feedback."""

    version: str
    bucket_range: tuple[int, int] | None
    shadow: bool
    predictions: int
    with_feedback: int
    with_label_feedback: int
    accuracy: float | None
    with_score_feedback: int
    mean_score: float | None
    latency_ms: Sequence[float]
    """p50, p90, p99."""

    def to_json(self) -> dict[str, Any]:
        p50, p90, p99 = self.latency_ms
        return {
            "version": self.version,
            "bucket_range": None if self.bucket_range is None else list(self.bucket_range),
            "shadow": self.shadow, "predictions": self.predictions,
            "with_feedback": self.with_feedback,
            "with_label_feedback": self.with_label_feedback, "accuracy": self.accuracy,
            "with_score_feedback": self.with_score_feedback, "mean_score": self.mean_score,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99},
        }


@dataclass(frozen=True, slots=True)
class Report:
    model: str
    query: ReportQuery
    rows: list[ReportRow]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, **self.query.to_json(),
                "rows": [row.to_json() for row in self.rows]}


class ReportStore:
    """Reads reports from the `predictions` and `feedback` tables."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def report(self, model: str, query: ReportQuery) -> Report:
        """The model's report; NotFound for a model the registry does not know."""
        async with self._pool.acquire() as conn:
            if await conn.fetchval(MODEL_EXISTS, model) is None:
                raise NotFound(f"model '{model}' not found")
            rows = await conn.fetch(
                REPORT, model, query.window, query.buckets, query.include_shadow,
                query.label_kind, query.score_kind,
            )
        return Report(model, query, [_row(row, query.buckets) for row in rows])


def band_range(band: int, bands: int) -> tuple[int, int]:
    """The buckets [lo, hi] that `bucket * bands // 10000 == band` selects."""
    return -(-band * BUCKETS // bands), -(-(band + 1) * BUCKETS // bands) - 1


def _row(row: Mapping[str, Any], bands: int) -> ReportRow:
    compared = row["compared"]
    return ReportRow(
        version=row["version"],
        bucket_range=None if row["band"] is None else band_range(row["band"], bands),
        shadow=row["shadow"], predictions=row["predictions"],
        with_feedback=row["with_feedback"], with_label_feedback=row["with_label_feedback"],
        accuracy=row["correct"] / compared if compared else None,
        with_score_feedback=row["with_score_feedback"],
        mean_score=None if row["mean_score"] is None else float(row["mean_score"]),
        latency_ms=tuple(row["latency"]),
    )
