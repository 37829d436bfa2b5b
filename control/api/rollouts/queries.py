"""The control API's SQL for rollouts (tables from services/mesh/infra/migrations/)."""

LOCK_ROLLOUT = "SELECT epoch, record FROM rollouts WHERE model = $1 FOR UPDATE"

ROLLOUT_STATE = "SELECT record, updated_at FROM rollouts WHERE model = $1"

MODEL_EXISTS = "SELECT true FROM models WHERE name = $1"

VERSION_NAMES = "SELECT version FROM model_versions WHERE model = $1"

VERSION_SIGNATURES = """
SELECT version, record -> 'signature' AS signature FROM model_versions WHERE model = $1
"""

UPDATE_ROLLOUT = """
UPDATE rollouts SET epoch = $2, record = $3, updated_at = now() WHERE model = $1
"""

INSERT_HISTORY = """
INSERT INTO rollout_history (model, epoch, record, author, reason) VALUES ($1, $2, $3, $4, $5)
"""

_HISTORY = "SELECT epoch, author, reason, created_at, record FROM rollout_history WHERE model = $1"

HISTORY = _HISTORY + " ORDER BY epoch DESC, id DESC LIMIT $2"

HISTORY_AT = _HISTORY + " AND epoch = $2 ORDER BY id DESC LIMIT 1"

HISTORY_BEFORE = _HISTORY + " AND epoch < $2 ORDER BY epoch DESC, id DESC LIMIT 1"

GUARDED = "SELECT record FROM rollouts WHERE record ? 'guard' ORDER BY model"

ALL_ROLLOUTS = "SELECT model, epoch, record FROM rollouts ORDER BY model"
