-- Identity: users, e-mails, identities, roles, preferences, sessions, single-use tokens,
-- sign-in throttling, and the minimal personal tenants. RLS enabled and forced on all.
-- Owner key first in every key (user_id, or tenant_id); global lookups by e-mail and by
-- (provider, subject) live in routing tables keyed by that natural key (docs/rls.md).

CREATE TABLE tollhouse.users (
    id uuid NOT NULL,
    display_name text,
    first_name text,
    last_name text,
    username text,
    avatar_url text,
    password_hash text,
    -- End users may read this, never the hash itself.
    has_password boolean GENERATED ALWAYS AS (password_hash IS NOT NULL) STORED,
    password_changed_at timestamptz,
    status text NOT NULL DEFAULT 'active',
    is_internal boolean NOT NULL DEFAULT false,
    plan_override text,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz,
    deleted_at timestamptz,
    CONSTRAINT users_pkey PRIMARY KEY (id),
    CONSTRAINT users_status_check CHECK (status IN ('active', 'suspended', 'disabled')),
    CONSTRAINT users_plan_override_check
        CHECK (plan_override IS NULL OR plan_override IN ('free', 'starter', 'pro', 'power')),
    CONSTRAINT users_display_name_check CHECK (char_length(display_name) <= 200),
    CONSTRAINT users_first_name_check CHECK (char_length(first_name) <= 100),
    CONSTRAINT users_last_name_check CHECK (char_length(last_name) <= 100),
    CONSTRAINT users_username_check CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{1,38}$'),
    CONSTRAINT users_avatar_url_check CHECK (char_length(avatar_url) <= 2048),
    CONSTRAINT users_metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE UNIQUE INDEX users_username_key ON tollhouse.users (lower(username))
    WHERE username IS NOT NULL;
CREATE INDEX users_metadata_idx ON tollhouse.users USING gin (metadata);

-- Several addresses per user, stored normalised; exactly one primary (a partial unique index
-- allows at most one; the service never leaves a user with addresses but no primary).
CREATE TABLE tollhouse.user_emails (
    user_id uuid NOT NULL REFERENCES tollhouse.users (id) ON DELETE CASCADE,
    email text NOT NULL,
    is_primary boolean NOT NULL DEFAULT false,
    verified boolean NOT NULL DEFAULT false,
    via text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    verified_at timestamptz,
    CONSTRAINT user_emails_pkey PRIMARY KEY (user_id, email),
    CONSTRAINT user_emails_normalised_check
        CHECK (email = lower(btrim(email)) AND char_length(email) BETWEEN 3 AND 254),
    CONSTRAINT user_emails_via_check
        CHECK (via IN ('email:password', 'google', 'apple', 'import', 'admin'))
);
CREATE UNIQUE INDEX user_emails_one_primary_key ON tollhouse.user_emails (user_id)
    WHERE is_primary;

-- Routing table: one address belongs to at most one user (the primary key decides races).
CREATE TABLE tollhouse.email_routes (
    email text NOT NULL,
    user_id uuid NOT NULL,
    CONSTRAINT email_routes_pkey PRIMARY KEY (email)
);

-- Google / Apple identities. The (provider, subject) pair is the permanent link.
CREATE TABLE tollhouse.user_identities (
    user_id uuid NOT NULL REFERENCES tollhouse.users (id) ON DELETE CASCADE,
    provider text NOT NULL,
    subject text NOT NULL,
    email text,
    email_verified boolean NOT NULL DEFAULT false,
    is_private_email boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    CONSTRAINT user_identities_pkey PRIMARY KEY (user_id, provider, subject),
    CONSTRAINT user_identities_provider_check CHECK (provider IN ('google', 'apple')),
    CONSTRAINT user_identities_subject_check CHECK (char_length(subject) BETWEEN 1 AND 255)
);

CREATE TABLE tollhouse.identity_routes (
    provider text NOT NULL,
    subject text NOT NULL,
    user_id uuid NOT NULL,
    CONSTRAINT identity_routes_pkey PRIMARY KEY (provider, subject)
);

CREATE TABLE tollhouse.user_roles (
    user_id uuid NOT NULL REFERENCES tollhouse.users (id) ON DELETE CASCADE,
    role text NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT user_roles_pkey PRIMARY KEY (user_id, role),
    CONSTRAINT user_roles_role_check CHECK (role IN ('superuser', 'admin', 'user', 'member'))
);

CREATE TABLE tollhouse.user_email_preferences (
    user_id uuid NOT NULL REFERENCES tollhouse.users (id) ON DELETE CASCADE,
    marketing boolean NOT NULL DEFAULT true,
    product_updates boolean NOT NULL DEFAULT true,
    payment_receipts boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT user_email_preferences_pkey PRIMARY KEY (user_id)
);

-- Opaque session tokens: the id is the public selector, only SHA-256 of the secret is kept.
CREATE TABLE tollhouse.sessions (
    id uuid NOT NULL,
    user_id uuid NOT NULL REFERENCES tollhouse.users (id) ON DELETE CASCADE,
    secret_hash bytea NOT NULL,
    method text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    authenticated_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    last_seen_at timestamptz,
    revoked_at timestamptz,
    CONSTRAINT sessions_pkey PRIMARY KEY (id),
    CONSTRAINT sessions_secret_hash_check CHECK (octet_length(secret_hash) = 32),
    CONSTRAINT sessions_method_check CHECK (method IN ('password', 'google', 'apple', 'signup'))
);
CREATE INDEX sessions_user_idx ON tollhouse.sessions (user_id) WHERE revoked_at IS NULL;

-- E-mail verification and password-reset tokens: random, hashed, single use, expiring.
CREATE TABLE tollhouse.user_tokens (
    id uuid NOT NULL,
    user_id uuid NOT NULL REFERENCES tollhouse.users (id) ON DELETE CASCADE,
    purpose text NOT NULL,
    email text,
    secret_hash bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    CONSTRAINT user_tokens_pkey PRIMARY KEY (id),
    CONSTRAINT user_tokens_purpose_check CHECK (purpose IN ('verify_email', 'reset_password')),
    CONSTRAINT user_tokens_secret_hash_check CHECK (octet_length(secret_hash) = 32)
);
CREATE INDEX user_tokens_user_idx ON tollhouse.user_tokens (user_id, purpose)
    WHERE used_at IS NULL;

-- Nonces of ID tokens already used, so a captured token cannot be replayed.
CREATE TABLE tollhouse.oidc_nonces (
    provider text NOT NULL,
    nonce_hash bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT oidc_nonces_pkey PRIMARY KEY (provider, nonce_hash)
);

-- Sign-in throttling: attempts per key (account or client address) per fixed window.
CREATE TABLE tollhouse.signin_attempts (
    key text NOT NULL,
    window_start timestamptz NOT NULL,
    attempts integer NOT NULL,
    CONSTRAINT signin_attempts_pkey PRIMARY KEY (key, window_start),
    CONSTRAINT signin_attempts_attempts_check CHECK (attempts >= 0)
);

-- Security-relevant events (links, claims, revocations), for operators.
CREATE TABLE tollhouse.identity_events (
    user_id uuid NOT NULL,
    id uuid NOT NULL,
    kind text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT identity_events_pkey PRIMARY KEY (user_id, id)
);

-- Minimal tenants: every user gets a personal one in the same transaction. The
-- organisations issue extends these tables.
CREATE TABLE tollhouse.tenants (
    id uuid NOT NULL,
    name text NOT NULL,
    owner_user_id uuid NOT NULL,
    is_default boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz,
    CONSTRAINT tenants_pkey PRIMARY KEY (id),
    CONSTRAINT tenants_name_check CHECK (char_length(name) BETWEEN 1 AND 200)
);
CREATE UNIQUE INDEX tenants_one_personal_key ON tollhouse.tenants (owner_user_id)
    WHERE is_default;

CREATE TABLE tollhouse.tenant_members (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id) ON DELETE CASCADE,
    user_id uuid NOT NULL,
    role text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenant_members_pkey PRIMARY KEY (tenant_id, user_id),
    CONSTRAINT tenant_members_role_check CHECK (role IN ('owner', 'admin', 'member'))
);
CREATE INDEX tenant_members_user_idx ON tollhouse.tenant_members (user_id);

-- One statement that counts an attempt for every key and says whether all were under the
-- limit: check and write together, so concurrent guesses cannot slip past the limit.
CREATE FUNCTION tollhouse.signin_attempt_v1(p_keys text[], p_limit integer, p_window interval)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_start timestamptz := date_bin(p_window, now(), timestamptz '2000-01-01 00:00:00+00');
    v_allowed boolean := true;
    v_key text;
    v_count integer;
BEGIN
    FOREACH v_key IN ARRAY p_keys LOOP
        INSERT INTO tollhouse.signin_attempts AS a (key, window_start, attempts)
        VALUES (v_key, v_start, 1)
        ON CONFLICT (key, window_start) DO UPDATE
            SET attempts = a.attempts + 1
            WHERE a.attempts < p_limit
        RETURNING a.attempts INTO v_count;
        IF v_count IS NULL THEN
            v_allowed := false;
        END IF;
        v_count := NULL;
    END LOOP;
    RETURN v_allowed;
END
$$;
REVOKE ALL ON FUNCTION tollhouse.signin_attempt_v1(text[], integer, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.signin_attempt_v1(text[], integer, interval)
    TO tollhouse_service;

-- Row-level security ------------------------------------------------------------------------
-- The service manages everything; an end user reads its own identity rows and updates only
-- the profile columns granted below.

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'users', 'user_emails', 'email_routes', 'user_identities', 'identity_routes',
        'user_roles', 'user_email_preferences', 'sessions', 'user_tokens', 'oidc_nonces',
        'signin_attempts', 'identity_events', 'tenants', 'tenant_members'
    ] LOOP
        EXECUTE format('ALTER TABLE tollhouse.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE tollhouse.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY %I ON tollhouse.%I TO tollhouse_service USING (true) WITH CHECK (true)',
            t || '_service', t);
        EXECUTE format(
            'GRANT SELECT, INSERT, UPDATE, DELETE ON tollhouse.%I TO tollhouse_service', t);
    END LOOP;
END
$$;

CREATE POLICY users_self_read ON tollhouse.users FOR SELECT TO tollhouse_user
    USING (id = (SELECT tollhouse.current_user_id()) AND deleted_at IS NULL);
CREATE POLICY users_self_update ON tollhouse.users FOR UPDATE TO tollhouse_user
    USING (id = (SELECT tollhouse.current_user_id()) AND deleted_at IS NULL)
    WITH CHECK (id = (SELECT tollhouse.current_user_id()));
GRANT SELECT (id, display_name, first_name, last_name, username, avatar_url, has_password,
              password_changed_at, status, is_internal, plan_override, metadata, created_at,
              updated_at, last_seen_at, deleted_at)
    ON tollhouse.users TO tollhouse_user;
GRANT UPDATE (display_name, first_name, last_name, username, avatar_url, updated_at)
    ON tollhouse.users TO tollhouse_user;

CREATE POLICY user_emails_self_read ON tollhouse.user_emails FOR SELECT TO tollhouse_user
    USING (user_id = (SELECT tollhouse.current_user_id()));
GRANT SELECT ON tollhouse.user_emails TO tollhouse_user;

CREATE POLICY user_identities_self_read ON tollhouse.user_identities FOR SELECT
    TO tollhouse_user USING (user_id = (SELECT tollhouse.current_user_id()));
GRANT SELECT ON tollhouse.user_identities TO tollhouse_user;

CREATE POLICY user_roles_self_read ON tollhouse.user_roles FOR SELECT TO tollhouse_user
    USING (user_id = (SELECT tollhouse.current_user_id()));
GRANT SELECT ON tollhouse.user_roles TO tollhouse_user;

CREATE POLICY user_email_preferences_self_read ON tollhouse.user_email_preferences
    FOR SELECT TO tollhouse_user USING (user_id = (SELECT tollhouse.current_user_id()));
CREATE POLICY user_email_preferences_self_update ON tollhouse.user_email_preferences
    FOR UPDATE TO tollhouse_user
    USING (user_id = (SELECT tollhouse.current_user_id()))
    WITH CHECK (user_id = (SELECT tollhouse.current_user_id()));
GRANT SELECT ON tollhouse.user_email_preferences TO tollhouse_user;
GRANT UPDATE (marketing, product_updates, payment_receipts, updated_at)
    ON tollhouse.user_email_preferences TO tollhouse_user;

CREATE POLICY sessions_self_read ON tollhouse.sessions FOR SELECT TO tollhouse_user
    USING (user_id = (SELECT tollhouse.current_user_id()));
GRANT SELECT (id, user_id, method, created_at, authenticated_at, expires_at, last_seen_at,
              revoked_at) ON tollhouse.sessions TO tollhouse_user;

CREATE POLICY tenants_member_read ON tollhouse.tenants FOR SELECT TO tollhouse_user
    USING (EXISTS (
        SELECT 1 FROM tollhouse.tenant_members m
        WHERE m.tenant_id = tenants.id AND m.user_id = (SELECT tollhouse.current_user_id())));
GRANT SELECT ON tollhouse.tenants TO tollhouse_user;

CREATE POLICY tenant_members_self_read ON tollhouse.tenant_members FOR SELECT
    TO tollhouse_user USING (user_id = (SELECT tollhouse.current_user_id()));
GRANT SELECT ON tollhouse.tenant_members TO tollhouse_user;
