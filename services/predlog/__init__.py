"""The prediction log: every prediction a router serves, kept in Postgres.

    log.py      PredictionLog (record, its writer task) and start_prediction_log
    journal.py  group commits: each answered prediction on local disk before the answer leaves
    rows.py     what is kept of a prediction (PredictionRecord) and the row it becomes
    table.py    the writer into the day-partitioned `predictions` table (asyncpg)
    spool.py    rows on local disk (journaled, or spilled while Postgres is down), replayed
    rejects.py  rows Postgres refused, set aside beside the spool
    metrics.py  its counters and gauges, and its rate-limited log lines

The router sees none of this: its core calls `record()` (and awaits what it returns) on a
`services.mesh.domain.predictions.PredictionRecorder`, and the router's wiring
(`services/router/wiring.py`) starts a PredictionLog and hands it in.
"""
