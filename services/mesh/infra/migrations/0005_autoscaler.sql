-- The autoscaler's decisions (control/autoscaler/runner.py): one row per change of a model
-- version's desired replicas, with what the policy looked at and why, for audit and tuning.
CREATE TABLE scale_decisions (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    model text NOT NULL,
    version text NOT NULL,
    previous integer NOT NULL CHECK (previous >= 0),
    desired integer NOT NULL CHECK (desired >= 0),
    reason text NOT NULL,
    inputs jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX scale_decisions_by_version ON scale_decisions (model, version, at DESC);
