"""The registry's SQL, in one place (tables from migrations/0001_registry.sql)."""

INSERT_MODEL = """
INSERT INTO models (name, description) VALUES ($1, $2)
ON CONFLICT (name) DO NOTHING RETURNING name
"""

_SUMMARY = """
SELECT m.name, m.description, m.created_at,
       (SELECT count(*) FROM model_versions v WHERE v.model = m.name) AS versions,
       (SELECT v.version FROM model_versions v WHERE v.model = m.name
         ORDER BY v.created_at DESC, v.version DESC LIMIT 1) AS latest,
       r.record AS rollout
FROM models m LEFT JOIN rollouts r ON r.model = m.name
"""

MODEL_SUMMARY = _SUMMARY + " WHERE m.name = $1"

LIST_MODELS = _SUMMARY + " ORDER BY m.name"

MODEL_VERSIONS = """
SELECT record FROM model_versions WHERE model = $1 ORDER BY created_at, version
"""

VERSION = "SELECT record FROM model_versions WHERE model = $1 AND version = $2"

VERSION_FOR_UPDATE = VERSION + " FOR UPDATE"

UPDATE_VERSION = "UPDATE model_versions SET record = $3 WHERE model = $1 AND version = $2"

INSERT_VERSION = """
INSERT INTO model_versions (model, version, record, sha256) VALUES ($1, $2, $3, $4)
ON CONFLICT (model, version) DO NOTHING RETURNING version
"""

ROLLOUT = "SELECT record FROM rollouts WHERE model = $1"

INSERT_ROLLOUT = """
INSERT INTO rollouts (model, epoch, record) VALUES ($1, $2, $3)
ON CONFLICT (model) DO NOTHING RETURNING epoch
"""

INSERT_HISTORY = """
INSERT INTO rollout_history (model, epoch, record, author, reason) VALUES ($1, $2, $3, $4, $5)
"""

ALL_VERSIONS = "SELECT model, version, record FROM model_versions ORDER BY model, version"

ALL_ROLLOUTS = "SELECT model, record FROM rollouts ORDER BY model"
