-- The legacy users.csv backfill (issue 7): runs with their checkpoint, the staged records
-- still to apply, the report's issues, and one provenance row per imported user. Plus the
-- credits function that opens imported accounts with their opening balance.

-- One import of one file with one set of options. A run row exists only once the whole file
-- is staged and classified (one transaction); a batch deletes the staged rows it applied in
-- its own transaction, so the staged rows left are exactly the work left.
CREATE TABLE tollhouse.import_runs (
    id uuid NOT NULL,
    file_sha256 bytea NOT NULL,
    options_sha256 bytea NOT NULL,
    file_name text NOT NULL,
    options jsonb NOT NULL,
    status text NOT NULL DEFAULT 'applying',
    records integer NOT NULL,
    staged integer NOT NULL DEFAULT 0,
    counts jsonb NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CONSTRAINT import_runs_pkey PRIMARY KEY (id),
    CONSTRAINT import_runs_status_check CHECK (status IN ('applying', 'done')),
    CONSTRAINT import_runs_sha_check
        CHECK (octet_length(file_sha256) = 32 AND octet_length(options_sha256) = 32),
    CONSTRAINT import_runs_counts_check CHECK (jsonb_typeof(counts) = 'object'),
    CONSTRAINT import_runs_options_check CHECK (jsonb_typeof(options) = 'object')
);
-- At most one unfinished run per file and options: a rerun after a crash resumes it.
CREATE UNIQUE INDEX import_runs_open_key ON tollhouse.import_runs (file_sha256, options_sha256)
    WHERE status = 'applying';

-- The records of a run that change something, classified; each is deleted by the batch
-- that applies it.
CREATE TABLE tollhouse.import_staging (
    run_id uuid NOT NULL REFERENCES tollhouse.import_runs (id) ON DELETE CASCADE,
    record_no integer NOT NULL,
    outcome text NOT NULL,
    user_id uuid NOT NULL,
    target_user_id uuid NOT NULL,
    tenant_id uuid,
    email text NOT NULL,
    provider text NOT NULL,
    subject text,
    link_identity boolean NOT NULL DEFAULT false,
    display_name text,
    created_at timestamptz,
    last_seen_at timestamptz,
    status text NOT NULL,
    marketing boolean NOT NULL,
    legacy_tier text NOT NULL,
    plan text NOT NULL,
    plan_override text,
    credits_total bigint,
    credits_balance bigint NOT NULL,
    daily_cap bigint,
    last_daily_reset timestamptz,
    period_end timestamptz,
    stripe_customer_id text,
    stripe_subscription_id text,
    billing_status text,
    fingerprint text NOT NULL,
    CONSTRAINT import_staging_pkey PRIMARY KEY (run_id, record_no),
    CONSTRAINT import_staging_outcome_check
        CHECK (outcome IN ('created', 'updated', 'merged'))
);

-- What the report says, record by record (errors, warnings, merges, skips).
CREATE TABLE tollhouse.import_issues (
    run_id uuid NOT NULL REFERENCES tollhouse.import_runs (id) ON DELETE CASCADE,
    record_no integer NOT NULL,
    seq integer NOT NULL,
    line_no integer NOT NULL,
    severity text NOT NULL,
    column_name text NOT NULL,
    value text NOT NULL,
    code text NOT NULL,
    message text NOT NULL,
    CONSTRAINT import_issues_pkey PRIMARY KEY (run_id, record_no, seq),
    CONSTRAINT import_issues_severity_check CHECK (severity IN ('error', 'warning', 'info'))
);

-- Provenance of every user the import created: the legacy values the model has no column
-- for (yet), and the fingerprint that tells an unchanged record from an updated one.
-- The Stripe ids wait here for the billing step (migration 0006's tables).
CREATE TABLE tollhouse.import_users (
    user_id uuid NOT NULL,
    run_id uuid NOT NULL,
    record_no integer NOT NULL,
    fingerprint text NOT NULL,
    legacy_tier text NOT NULL,
    plan text NOT NULL,
    credits_total bigint,
    opening_balance bigint NOT NULL,
    stripe_customer_id text,
    stripe_subscription_id text,
    billing_status text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT import_users_pkey PRIMARY KEY (user_id),
    CONSTRAINT import_users_billing_status_check
        CHECK (billing_status IN ('active', 'past_due', 'canceled'))
);

-- Ids for rows made in bulk: the time-ordered prefix (48-bit milliseconds, version, 12-bit
-- sub-millisecond) of one tollhouse.uuid7() per statement, then the RFC 9562 variant and a
-- 62-bit counter. Unique while no two bases share their first 8 bytes (each base is a fresh
-- uuid7(), made at least a microsecond apart); a clash would be refused by the primary key.
-- About ten times cheaper per row than tollhouse.uuid7().
CREATE FUNCTION tollhouse.uuid7_seq(p_base uuid, p_n bigint) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT encode(overlay(uuid_send(p_base) PLACING int8send(p_n - 9223372036854775807 - 1)
                          FROM 9 FOR 8), 'hex')::uuid
$$;
REVOKE ALL ON FUNCTION tollhouse.uuid7_seq(uuid, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.uuid7_seq(uuid, bigint) TO tollhouse_service;

-- Opens the credit accounts of newly imported tenants with their opening balances, set-wise:
-- each account, its `import` grant (once per user: source_id 'import:<user id>') and the
-- ledger row of that grant are written by this one statement, so balance = ledger = grants
-- by construction. The imported balance stands for the current period's allowance
-- (allowance_for = period_start); periods then count whole months from period_start. An
-- account that exists already is left alone (no grant, no ledger row). Callers running in
-- parallel pass disjoint `p_id_offset`s, so their bulk ids never meet.
CREATE FUNCTION tollhouse.credit_import_accounts_v1(
    p_tenants uuid[], p_users uuid[], p_plans text[], p_balances bigint[],
    p_daily_caps bigint[], p_last_resets timestamptz[], p_period_ends timestamptz[],
    p_metadata jsonb[], p_id_offset bigint
) RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH input AS (
        SELECT i.tenant_id, i.user_id, i.plan, i.balance, i.daily_cap, i.last_reset,
               coalesce(i.period_end - interval '1 month', now()) AS period_start,
               coalesce(i.period_end, now() + interval '1 month') AS period_end,
               i.metadata
        FROM unnest(p_tenants, p_users, p_plans, p_balances, p_daily_caps, p_last_resets,
                    p_period_ends, p_metadata)
             AS i(tenant_id, user_id, plan, balance, daily_cap, last_reset, period_end, metadata)
    ), acc AS (
        INSERT INTO tollhouse.credit_accounts AS a
            (tenant_id, plan, balance, overdraft_limit, daily_cap, day_start, period_start,
             period_end, allowance_for, created_at)
        SELECT i.tenant_id, pl.name, i.balance, pl.overdraft_limit,
               coalesce(i.daily_cap, pl.daily_cap), (i.last_reset AT TIME ZONE 'UTC')::date,
               i.period_start, i.period_end, i.period_start, i.period_start
        FROM input i JOIN tollhouse.plans pl ON pl.name = i.plan
        ON CONFLICT (tenant_id) DO NOTHING
        RETURNING a.tenant_id, a.balance
    ), base AS (
        SELECT tollhouse.uuid7() AS grants, tollhouse.uuid7() AS ledger
    ), opening AS (
        SELECT i.tenant_id, i.user_id, i.balance, i.metadata,
               tollhouse.uuid7_seq(b.grants, p_id_offset + row_number() OVER (ORDER BY i.tenant_id))
                   AS grant_id,
               tollhouse.uuid7_seq(b.ledger, p_id_offset + row_number() OVER (ORDER BY i.tenant_id))
                   AS ledger_id
        FROM acc JOIN input i ON i.tenant_id = acc.tenant_id CROSS JOIN base b
        WHERE i.balance > 0
    ), g AS (
        INSERT INTO tollhouse.credit_grants
            (tenant_id, id, source, source_id, total, remaining, priority, expires_at)
        SELECT o.tenant_id, o.grant_id, 'import', 'import:' || o.user_id, o.balance, o.balance,
               0, NULL
        FROM opening o
    ), l AS (
        INSERT INTO tollhouse.credit_ledger
            (tenant_id, id, kind, reason, delta, balance_after, grant_id, metadata)
        SELECT o.tenant_id, o.ledger_id, 'grant', 'grant.import', o.balance, o.balance,
               o.grant_id, o.metadata
        FROM opening o
    )
    SELECT count(*)::integer FROM acc
$$;
REVOKE ALL ON FUNCTION tollhouse.credit_import_accounts_v1(
    uuid[], uuid[], text[], bigint[], bigint[], timestamptz[], timestamptz[], jsonb[], bigint)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.credit_import_accounts_v1(
    uuid[], uuid[], text[], bigint[], bigint[], timestamptz[], timestamptz[], jsonb[], bigint)
    TO tollhouse_service;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['import_runs', 'import_staging', 'import_issues', 'import_users']
    LOOP
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
