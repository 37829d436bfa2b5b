-- Online features (`PUT /v1/features/...` on the gateway; read by the routers): the latest
-- value of each (tenant, entity type, entity id, feature name). `event_time` is when the value
-- was true (a feature's age, checked against its `max_age_s`, is measured from it);
-- `updated_at` when it was written. A tenant reads only the rows it wrote.

CREATE TABLE features (
    tenant      text        NOT NULL,
    entity_type text        NOT NULL,
    entity_id   text        NOT NULL,
    name        text        NOT NULL,
    value       jsonb       NOT NULL,
    event_time  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, entity_type, entity_id, name)
);

-- Which features each prediction was served with: {name: status} (present, defaulted_missing,
-- defaulted_stale, store_down); NULL when the version names no features.
ALTER TABLE predictions ADD COLUMN features jsonb;
