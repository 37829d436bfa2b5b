-- Feedback on predictions (`POST /v1/feedback` on the gateway): a label or a score per
-- (tenant, request id, kind). Posting the same kind again for a request replaces the value,
-- so retries are idempotent. The report joins it with `predictions` on (tenant, request_id).

CREATE TABLE feedback (
    tenant      text             NOT NULL,
    request_id  text             NOT NULL,
    kind        text             NOT NULL,
    label       text,
    score       double precision,
    received_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, request_id, kind),
    CHECK ((label IS NULL) <> (score IS NULL))
);
