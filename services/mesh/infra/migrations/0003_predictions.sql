-- The prediction log: one row per prediction served (shadow mirrors marked), written by the
-- routers off the hot path in COPY batches, partitioned by UTC day of `ts`.
--
-- `inputs`/`outputs` follow the model's policy: full (the tensors as JSON), digest (a sha256
-- per tensor) or none (NULL). `label` is the predicted class or value the report compares with
-- feedback labels (NULL under policy none). The primary key makes a replayed spill idempotent:
-- writers insert through a staging table with ON CONFLICT DO NOTHING.

CREATE TABLE predictions (
    ts          timestamptz      NOT NULL,
    request_id  text             NOT NULL,
    tenant      text             NOT NULL,
    model       text             NOT NULL,
    version     text             NOT NULL,
    bucket      integer,
    shadow      boolean          NOT NULL DEFAULT false,
    latency_ms  double precision NOT NULL,
    trace_id    text,
    label       text,
    inputs      jsonb,
    outputs     jsonb,
    PRIMARY KEY (ts, request_id, version, shadow)
) PARTITION BY RANGE (ts);

CREATE INDEX predictions_request ON predictions (request_id);
CREATE INDEX predictions_model_ts ON predictions (model, ts);

-- Create the partition holding UTC day `day` unless it exists; safe to call concurrently.
CREATE FUNCTION infermesh_ensure_prediction_partition(day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('predictions_%s', to_char(day, 'YYYYMMDD'));
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(part));
    IF to_regclass(part) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF predictions FOR VALUES FROM (%L) TO (%L)',
            part, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC'
        );
    END IF;
END
$$;
