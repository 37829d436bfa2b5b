-- Rows a tenant uploads once (`POST /v1/job-inputs` on the gateway) and names in any number of
-- jobs (`POST /v1/jobs` with `inputs_ref`). A job copies the rows into its own `job_rows` when
-- it is created, so deleting or expiring an upload never changes a job. `sha256` is over the
-- body as uploaded, for the client to check. Uploads expire like finished jobs (`expires_at`,
-- upload + the gateway's job_retention_s); the job runners' sweep deletes them.

CREATE TABLE job_inputs (
    id         text        PRIMARY KEY,
    tenant     text        NOT NULL,
    rows_total integer     NOT NULL CHECK (rows_total > 0),
    bytes      bigint      NOT NULL,
    sha256     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX job_inputs_expiry ON job_inputs (expires_at);
CREATE INDEX job_inputs_tenant ON job_inputs (tenant, created_at);

CREATE TABLE job_input_rows (
    input_id text    NOT NULL REFERENCES job_inputs (id) ON DELETE CASCADE,
    idx      integer NOT NULL,
    input    bytea   NOT NULL,
    PRIMARY KEY (input_id, idx)
);
