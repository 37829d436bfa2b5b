-- Tenants, their API keys (salted hashes only) and per-model limits, with one audit trail.
-- The control API publishes these to etcd as tenants/{name}, apikeys/{key_id} (active keys
-- only) and limits/{model}.

CREATE TABLE tenants (
    name       text PRIMARY KEY,
    record     jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Never the secret: `hash` is sha256(salt || secret), and the full key is shown once.
CREATE TABLE api_keys (
    key_id     text PRIMARY KEY,
    tenant     text NOT NULL REFERENCES tenants (name),
    prefix     text NOT NULL,
    salt       text NOT NULL,
    hash       text NOT NULL,
    note       text NOT NULL DEFAULT '',
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    revoked_by text,
    CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);

CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);

CREATE TABLE model_limits (
    model      text PRIMARY KEY REFERENCES models (name),
    record     jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every change to the three tables: who, when, what. A key's entry has no salt or hash.
CREATE TABLE tenancy_history (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('tenant', 'api_key', 'model_limits')),
    subject    text NOT NULL,
    action     text NOT NULL,
    record     jsonb,
    author     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tenancy_history_subject ON tenancy_history (kind, subject, id);
