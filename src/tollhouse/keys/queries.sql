-- Service API keys (tollhouse.keys.service).

-- name: create
INSERT INTO tollhouse.service_api_keys (id, name, prefix, key_hash)
VALUES (%(id)s, %(name)s, %(prefix)s, %(key_hash)s)
RETURNING id, name, prefix, bootstrap, created_at, last_used_at, revoked_at

-- name: create_bootstrap
-- Only one bootstrap key can ever exist (partial unique index): the loser of a race gets
-- no row back and prints nothing.
INSERT INTO tollhouse.service_api_keys (id, name, prefix, key_hash, bootstrap)
SELECT %(id)s, %(name)s, %(prefix)s, %(key_hash)s, true
WHERE NOT EXISTS (SELECT 1 FROM tollhouse.service_api_keys)
ON CONFLICT DO NOTHING
RETURNING id, name, prefix, bootstrap, created_at, last_used_at, revoked_at

-- name: list
SELECT id, name, prefix, bootstrap, created_at, last_used_at, revoked_at
FROM tollhouse.service_api_keys
WHERE %(include_revoked)s OR revoked_at IS NULL
ORDER BY created_at, id

-- name: revoke
-- By id when the caller gave one, else the active key of that name; never both.
UPDATE tollhouse.service_api_keys
SET revoked_at = coalesce(revoked_at, now())
WHERE CASE WHEN %(id)s::uuid IS NOT NULL THEN id = %(id)s::uuid
           ELSE name = %(name)s AND revoked_at IS NULL END
RETURNING id, name, prefix, bootstrap, created_at, last_used_at, revoked_at

-- name: authenticate
-- Checks the key and stamps its use in one round trip. Callers cache the answer briefly.
UPDATE tollhouse.service_api_keys
SET last_used_at = now()
WHERE key_hash = %(key_hash)s AND revoked_at IS NULL
RETURNING id, name, prefix, bootstrap, created_at, last_used_at, revoked_at
