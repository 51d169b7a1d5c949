-- Foundation: the roles row-level security builds on, the acting-user function, and the
-- service API keys. The runner has already created the schema `tollhouse` and its
-- `schema_migrations` table. See docs/rls.md for the pattern later tables follow.

-- Roles are global to the cluster: create them once, tolerate a concurrent creator.
DO $$
BEGIN
    BEGIN
        CREATE ROLE tollhouse_service NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    BEGIN
        CREATE ROLE tollhouse_user NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    -- The login role that migrates is also the one the service connects as; it switches
    -- to tollhouse_service for its work and to tollhouse_user for end-user queries.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT tollhouse_service, tollhouse_user TO %I', current_user);
    END IF;
END
$$;

REVOKE ALL ON SCHEMA tollhouse FROM PUBLIC;
GRANT USAGE ON SCHEMA tollhouse TO tollhouse_service, tollhouse_user;
GRANT SELECT ON tollhouse.schema_migrations TO tollhouse_service;

-- The acting user of the current transaction, for RLS policies: NULL (so every policy is
-- false) unless the service set it with set_config('tollhouse.user_id', id, true).
CREATE FUNCTION tollhouse.current_user_id() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT nullif(current_setting('tollhouse.user_id', true), '')::uuid $$;

REVOKE ALL ON FUNCTION tollhouse.current_user_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.current_user_id() TO tollhouse_service, tollhouse_user;

-- Keys for server-to-server calls. Only a SHA-256 of each key is kept: keys are 256-bit
-- random, so a fast hash is as safe as a slow one and costs nothing per request.
CREATE TABLE tollhouse.service_api_keys (
    id uuid NOT NULL,
    name text NOT NULL,
    prefix text NOT NULL,
    key_hash bytea NOT NULL,
    bootstrap boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz,
    CONSTRAINT service_api_keys_pkey PRIMARY KEY (id),
    CONSTRAINT service_api_keys_key_hash_key UNIQUE (key_hash),
    CONSTRAINT service_api_keys_name_check CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9 ._:@/-]{0,99}$'),
    CONSTRAINT service_api_keys_hash_length_check CHECK (octet_length(key_hash) = 32)
);
-- One active key per name; revoked names may be reused.
CREATE UNIQUE INDEX service_api_keys_active_name_key
    ON tollhouse.service_api_keys (name) WHERE revoked_at IS NULL;
-- At most one key is ever created automatically, even when two services start at once.
CREATE UNIQUE INDEX service_api_keys_one_bootstrap_key
    ON tollhouse.service_api_keys (bootstrap) WHERE bootstrap;

ALTER TABLE tollhouse.service_api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE tollhouse.service_api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY service_api_keys_service ON tollhouse.service_api_keys
    TO tollhouse_service USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE ON tollhouse.service_api_keys TO tollhouse_service;
