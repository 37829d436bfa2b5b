-- Outgoing webhooks (services/webhooks, docs/WEBHOOKS.md). A delivery row is written in the
-- transaction of whatever it reports on (a job finishing), so the two commit together; the
-- gateway's dispatcher claims due rows (FOR UPDATE SKIP LOCKED), POSTs them and records every
-- attempt. `id` is the webhook-id the receiver deduplicates on: it never changes across retries.

CREATE TABLE webhook_deliveries (
    id              text        PRIMARY KEY,
    tenant          text        NOT NULL,
    url             text        NOT NULL,
    secret          text        NOT NULL,
    event_type      text        NOT NULL,
    body            bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed', 'gone')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    last_error      text
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_tenant ON webhook_deliveries (tenant, created_at);

-- One row per POST tried (or refused before sending): the status code, or the error.
CREATE TABLE webhook_attempts (
    delivery_id text             NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer          NOT NULL,
    at          timestamptz      NOT NULL,
    status_code integer,
    error       text,
    duration_ms double precision NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

-- An endpoint that answered 410 Gone: nothing more is sent to it for that tenant.
CREATE TABLE webhook_disabled_endpoints (
    tenant      text        NOT NULL,
    url         text        NOT NULL,
    disabled_at timestamptz NOT NULL DEFAULT now(),
    reason      text        NOT NULL,
    PRIMARY KEY (tenant, url)
);
