"""The control API's SQL for tenants, API keys and model limits (migrations/0002_tenancy.sql)."""

MODEL_NAMES = "SELECT name FROM models"

MODEL_EXISTS = "SELECT true FROM models WHERE name = $1"

TENANT_EXISTS = "SELECT true FROM tenants WHERE name = $1"

INSERT_TENANT = """
INSERT INTO tenants (name, record) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING true
"""

LOCK_TENANT = "SELECT record FROM tenants WHERE name = $1 FOR UPDATE"

UPDATE_TENANT = "UPDATE tenants SET record = $2, updated_at = now() WHERE name = $1"

TENANT_STATE = "SELECT record, created_at, updated_at FROM tenants WHERE name = $1"

TENANT_STATES = "SELECT record, created_at, updated_at FROM tenants ORDER BY name"

_KEY_INFO = """
SELECT key_id, tenant, prefix, note, created_by, created_at, revoked_at, revoked_by FROM api_keys
"""

INSERT_KEY = """
INSERT INTO api_keys (key_id, tenant, prefix, salt, hash, note, created_by)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING key_id, tenant, prefix, note, created_by, created_at, revoked_at, revoked_by
"""

KEYS_OF = _KEY_INFO + " WHERE tenant = $1 ORDER BY created_at, key_id"

KEY_INFO = _KEY_INFO + " WHERE key_id = $1"

REVOKE_KEY = """
UPDATE api_keys SET revoked_at = now(), revoked_by = $2
WHERE key_id = $1 AND revoked_at IS NULL
RETURNING key_id, tenant, prefix, note, created_by, created_at, revoked_at, revoked_by
"""

UPSERT_LIMITS = """
INSERT INTO model_limits (model, record) VALUES ($1, $2)
ON CONFLICT (model) DO UPDATE SET record = excluded.record, updated_at = now()
"""

LIMITS = "SELECT record FROM model_limits WHERE model = $1"

DELETE_LIMITS = "DELETE FROM model_limits WHERE model = $1 RETURNING true"

INSERT_HISTORY = """
INSERT INTO tenancy_history (kind, subject, action, record, author) VALUES ($1, $2, $3, $4, $5)
"""

# What etcd should hold: one record by name, and every record (as name, record columns).

TENANT_RECORD = "SELECT record FROM tenants WHERE name = $1"

TENANT_RECORDS = "SELECT name, record FROM tenants"

_ACTIVE_KEYS = "SELECT key_id AS name, key_id, tenant, salt, hash FROM api_keys"

ACTIVE_KEY = _ACTIVE_KEYS + " WHERE key_id = $1 AND revoked_at IS NULL"

ACTIVE_KEYS = _ACTIVE_KEYS + " WHERE revoked_at IS NULL"

LIMITS_RECORD = LIMITS

LIMITS_RECORDS = "SELECT model AS name, record FROM model_limits"
