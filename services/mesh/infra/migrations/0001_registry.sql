-- Models, their immutable versions, and the rollout that says which versions serve.

CREATE TABLE models (
    name        text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_versions (
    model      text NOT NULL REFERENCES models (name),
    version    text NOT NULL,
    record     jsonb NOT NULL,
    sha256     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

CREATE INDEX model_versions_sha256 ON model_versions (sha256);

CREATE TABLE rollouts (
    model      text PRIMARY KEY REFERENCES models (name),
    epoch      integer NOT NULL,
    record     jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every rollout ever published, for audit and rollback.
CREATE TABLE rollout_history (
    id         bigserial PRIMARY KEY,
    model      text NOT NULL,
    epoch      integer NOT NULL,
    record     jsonb NOT NULL,
    author     text NOT NULL,
    reason     text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX rollout_history_model ON rollout_history (model, epoch);
