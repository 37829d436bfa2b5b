-- Async jobs (`POST /v1/jobs` on the gateway): one row per job, one row per input of a job.
-- A gateway's job runner claims a runnable job with a lease (`runner`, `lease_until`); after
-- a crash the lease expires and any runner takes the job over, running only rows still
-- `pending`. A row's output is written with its status in the runner's chunk transaction,
-- guarded by `status = 'pending'`, so it is written at most once. Finished jobs expire at
-- `expires_at` (finish + the gateway's job_retention_s) and the runners' sweep deletes them.

CREATE TABLE jobs (
    id             text        PRIMARY KEY,
    tenant         text        NOT NULL,
    model          text        NOT NULL,
    version        text,
    status         text        NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    rows_total     integer     NOT NULL CHECK (rows_total > 0),
    rows_done      integer     NOT NULL DEFAULT 0,
    rows_failed    integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    expires_at     timestamptz,
    runner         text,
    lease_until    timestamptz,
    webhook_url    text,
    webhook_secret text,
    error          text
);

CREATE INDEX jobs_runnable ON jobs (created_at) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX jobs_tenant ON jobs (tenant, created_at);

CREATE TABLE job_rows (
    job_id  text    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx     integer NOT NULL,
    input   bytea   NOT NULL,
    output  bytea,
    status  text    NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'done', 'failed')),
    PRIMARY KEY (job_id, idx)
);
