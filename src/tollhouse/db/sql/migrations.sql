-- Queries of the migration runner (tollhouse.db.migrate).

-- name: lock
-- One migrator per database at a time; session-level, released by `unlock`.
SELECT pg_advisory_lock(7010611070417)

-- name: unlock
SELECT pg_advisory_unlock(7010611070417)

-- name: bootstrap
CREATE SCHEMA IF NOT EXISTS tollhouse;
CREATE TABLE IF NOT EXISTS tollhouse.schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration_ms integer NOT NULL,
    CONSTRAINT schema_migrations_pkey PRIMARY KEY (version)
)

-- name: history_exists
SELECT to_regclass('tollhouse.schema_migrations') IS NOT NULL

-- name: applied
SELECT version, name, checksum, applied_at FROM tollhouse.schema_migrations ORDER BY version

-- name: record
INSERT INTO tollhouse.schema_migrations (version, name, checksum, duration_ms)
VALUES (%(version)s, %(name)s, %(checksum)s, %(duration_ms)s)
