-- Credits: plans, accounts, grants, an append-only ledger, idempotent debits with sticky
-- outcomes, daily caps and overdraft. Every money change is one PL/pgSQL call that locks the
-- tenant's account, checks and writes together; constraints hold the floors.

-- A UUIDv7 made in SQL (PostgreSQL 15+ has no uuidv7()): 48 bits of Unix milliseconds,
-- the version, 12 bits of sub-millisecond time (RFC 9562 method 3, so ids made one after
-- the other in a transaction sort in order), then random bits.
CREATE FUNCTION tollhouse.uuid7() RETURNS uuid
    LANGUAGE plpgsql VOLATILE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_ms bigint := floor(extract(epoch FROM v_now) * 1000)::bigint;
    v_sub integer := ((extract(microseconds FROM v_now)::bigint % 1000) * 4096 / 1000)::integer;
    v_bytes bytea := uuid_send(gen_random_uuid());
BEGIN
    v_bytes := overlay(v_bytes PLACING substring(int8send(v_ms) FROM 3) FROM 1 FOR 6);
    v_bytes := overlay(v_bytes PLACING int2send((28672 + v_sub)::smallint) FROM 7 FOR 2);
    RETURN encode(v_bytes, 'hex')::uuid;
END
$$;
REVOKE ALL ON FUNCTION tollhouse.uuid7() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.uuid7() TO tollhouse_service;

CREATE TABLE tollhouse.plans (
    name text NOT NULL,
    monthly_credits bigint NOT NULL,
    daily_cap bigint,
    overdraft_limit bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plans_pkey PRIMARY KEY (name),
    CONSTRAINT plans_name_check CHECK (name ~ '^[a-z][a-z0-9_-]{0,31}$'),
    CONSTRAINT plans_monthly_credits_check CHECK (monthly_credits >= 0),
    CONSTRAINT plans_daily_cap_check CHECK (daily_cap IS NULL OR daily_cap > 0),
    CONSTRAINT plans_overdraft_limit_check CHECK (overdraft_limit >= 0)
);
INSERT INTO tollhouse.plans (name, monthly_credits, daily_cap, overdraft_limit) VALUES
    ('free', 100, 25, 0),
    ('starter', 1000, NULL, 0),
    ('pro', 5000, NULL, 100),
    ('power', 20000, NULL, 500);

-- One account per tenant: the cached balance and the limits, updated in the same
-- transaction as the grants and the ledger.
CREATE TABLE tollhouse.credit_accounts (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id),
    plan text NOT NULL REFERENCES tollhouse.plans (name),
    balance bigint NOT NULL DEFAULT 0,
    reserved bigint NOT NULL DEFAULT 0,
    overdraft_limit bigint NOT NULL DEFAULT 0,
    daily_cap bigint,
    daily_used bigint NOT NULL DEFAULT 0,
    day_start date,
    time_zone text NOT NULL DEFAULT 'UTC',
    period_start timestamptz NOT NULL,
    period_end timestamptz NOT NULL,
    allowance_for timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_accounts_pkey PRIMARY KEY (tenant_id),
    -- The floor: never below the overdraft limit. (Debits and holds also keep
    -- balance - reserved above it; an expiry may not, so that is checked where they are made:
    -- a hold does not stop the credits under it from expiring.)
    CONSTRAINT credit_accounts_floor_check CHECK (balance >= -overdraft_limit),
    CONSTRAINT credit_accounts_reserved_check CHECK (reserved >= 0),
    CONSTRAINT credit_accounts_daily_used_check CHECK (daily_used >= 0),
    CONSTRAINT credit_accounts_overdraft_limit_check CHECK (overdraft_limit >= 0),
    CONSTRAINT credit_accounts_daily_cap_check CHECK (daily_cap IS NULL OR daily_cap > 0),
    CONSTRAINT credit_accounts_period_check CHECK (period_end > period_start)
);

-- Credits are held in grants, consumed by priority (higher first), then soonest expiry.
CREATE TABLE tollhouse.credit_grants (
    tenant_id uuid NOT NULL REFERENCES tollhouse.credit_accounts (tenant_id),
    id uuid NOT NULL,
    source text NOT NULL,
    source_id text,
    total bigint NOT NULL,
    remaining bigint NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_grants_pkey PRIMARY KEY (tenant_id, id),
    -- One Stripe event, invoice or period grants once.
    CONSTRAINT credit_grants_source_key UNIQUE (tenant_id, source, source_id),
    CONSTRAINT credit_grants_source_check
        CHECK (source IN ('plan', 'purchase', 'promo', 'adjustment', 'import', 'refund')),
    CONSTRAINT credit_grants_source_id_check CHECK (char_length(source_id) BETWEEN 1 AND 200),
    CONSTRAINT credit_grants_total_check CHECK (total > 0),
    CONSTRAINT credit_grants_remaining_check CHECK (remaining >= 0 AND remaining <= total)
);
CREATE INDEX credit_grants_live_idx ON tollhouse.credit_grants
    (tenant_id, priority DESC, expires_at ASC NULLS LAST, created_at, id) WHERE remaining > 0;

-- The ledger: one row per change, never updated or deleted (the service role may only
-- insert and read); a correction is a new row.
CREATE TABLE tollhouse.credit_ledger (
    tenant_id uuid NOT NULL REFERENCES tollhouse.credit_accounts (tenant_id),
    id uuid NOT NULL,
    kind text NOT NULL,
    reason text NOT NULL,
    delta bigint NOT NULL,
    balance_after bigint NOT NULL,
    turn_id text,
    session_id text,
    acting_user_id uuid,
    grant_id uuid,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_ledger_pkey PRIMARY KEY (tenant_id, id),
    CONSTRAINT credit_ledger_kind_check CHECK (kind IN ('debit', 'grant', 'expiry', 'refund')),
    CONSTRAINT credit_ledger_reason_check CHECK (reason ~ '^[a-z][a-z0-9_.:-]{0,63}$'),
    CONSTRAINT credit_ledger_metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE UNIQUE INDEX credit_ledger_expiry_once_key ON tollhouse.credit_ledger (tenant_id, grant_id)
    WHERE kind = 'expiry';

-- How each debit split across grants.
CREATE TABLE tollhouse.credit_ledger_splits (
    tenant_id uuid NOT NULL,
    ledger_id uuid NOT NULL,
    grant_id uuid NOT NULL,
    amount bigint NOT NULL,
    CONSTRAINT credit_ledger_splits_pkey PRIMARY KEY (tenant_id, ledger_id, grant_id),
    CONSTRAINT credit_ledger_splits_amount_check CHECK (amount > 0)
);

-- The first outcome of every (tenant, turn_id): a retry returns it, a rejection included.
CREATE TABLE tollhouse.credit_debits (
    tenant_id uuid NOT NULL REFERENCES tollhouse.credit_accounts (tenant_id),
    turn_id text NOT NULL,
    amount bigint NOT NULL,
    status text NOT NULL,
    code text,
    ledger_id uuid,
    balance_after bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_debits_pkey PRIMARY KEY (tenant_id, turn_id),
    CONSTRAINT credit_debits_status_check CHECK (
        (status = 'applied' AND ledger_id IS NOT NULL AND code IS NULL)
        OR (status = 'rejected' AND ledger_id IS NULL AND code IS NOT NULL)),
    CONSTRAINT credit_debits_turn_id_check CHECK (char_length(turn_id) BETWEEN 1 AND 200)
);

-- Holds for streaming turns whose cost is known only at the end.
CREATE TABLE tollhouse.credit_reservations (
    tenant_id uuid NOT NULL REFERENCES tollhouse.credit_accounts (tenant_id),
    turn_id text NOT NULL,
    amount bigint NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    day date NOT NULL,
    expires_at timestamptz NOT NULL,
    committed_amount bigint,
    available_after bigint NOT NULL,
    acting_user_id uuid,
    session_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    CONSTRAINT credit_reservations_pkey PRIMARY KEY (tenant_id, turn_id),
    CONSTRAINT credit_reservations_amount_check CHECK (amount > 0),
    CONSTRAINT credit_reservations_status_check
        CHECK (status IN ('pending', 'committed', 'released', 'expired')),
    CONSTRAINT credit_reservations_committed_check
        CHECK (committed_amount IS NULL OR committed_amount BETWEEN 0 AND amount)
);
CREATE INDEX credit_reservations_pending_idx ON tollhouse.credit_reservations
    (tenant_id, expires_at) WHERE status = 'pending';

-- How much of each debit has been refunded (a refund names the total, so it is idempotent).
CREATE TABLE tollhouse.credit_refunds (
    tenant_id uuid NOT NULL REFERENCES tollhouse.credit_accounts (tenant_id),
    ledger_id uuid NOT NULL,
    refunded bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_refunds_pkey PRIMARY KEY (tenant_id, ledger_id),
    CONSTRAINT credit_refunds_refunded_check CHECK (refunded > 0)
);

-- Non-credit quotas (seed 002): a counter per tenant, metric and window.
CREATE TABLE tollhouse.usage_counters (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id),
    metric text NOT NULL,
    window_start timestamptz NOT NULL,
    used bigint NOT NULL,
    CONSTRAINT usage_counters_pkey PRIMARY KEY (tenant_id, metric, window_start),
    CONSTRAINT usage_counters_metric_check CHECK (metric ~ '^[a-z][a-z0-9_.:-]{0,63}$'),
    CONSTRAINT usage_counters_used_check CHECK (used >= 0)
);

-- Routing table: a turn_id belongs to one tenant, so a retry naming another payer is a
-- conflict, not a second charge.
CREATE TABLE tollhouse.credit_turns (
    turn_id text NOT NULL,
    tenant_id uuid NOT NULL,
    CONSTRAINT credit_turns_pkey PRIMARY KEY (turn_id)
);

CREATE TYPE tollhouse.credit_debit_result AS (
    tenant_id uuid,
    status text,
    code text,
    ledger_id uuid,
    amount bigint,
    balance_after bigint,
    replayed boolean
);

-- The personal tenant of a user (not deleted), or NULL.
CREATE FUNCTION tollhouse.credit_personal_tenant_v1(p_user uuid) RETURNS uuid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.id
    FROM tollhouse.tenants t JOIN tollhouse.users u ON u.id = t.owner_user_id
    WHERE t.owner_user_id = p_user AND t.is_default
      AND t.deleted_at IS NULL AND u.deleted_at IS NULL
$$;

-- Adds a grant to a locked account: debt (a negative balance) is repaid first.
CREATE FUNCTION tollhouse.credit_apply_grant_v1(
    p_tenant uuid, p_amount bigint, p_source text, p_source_id text, p_priority integer,
    p_expires_at timestamptz, p_reason text, p_user uuid, p_kind text DEFAULT 'grant'
) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_balance bigint;
    v_grant uuid := tollhouse.uuid7();
    v_ledger uuid := tollhouse.uuid7();
    v_repay bigint;
BEGIN
    SELECT balance INTO v_balance FROM tollhouse.credit_accounts WHERE tenant_id = p_tenant;
    v_repay := least(p_amount, greatest(0, -v_balance));
    INSERT INTO tollhouse.credit_grants
        (tenant_id, id, source, source_id, total, remaining, priority, expires_at)
    VALUES (p_tenant, v_grant, p_source, p_source_id, p_amount, p_amount - v_repay,
            p_priority, p_expires_at);
    UPDATE tollhouse.credit_accounts
    SET balance = balance + p_amount, updated_at = now()
    WHERE tenant_id = p_tenant;
    INSERT INTO tollhouse.credit_ledger
        (tenant_id, id, kind, reason, delta, balance_after, acting_user_id, grant_id)
    VALUES (p_tenant, v_ledger, p_kind, p_reason, p_amount, v_balance + p_amount, p_user,
            v_grant);
    RETURN v_grant;
END
$$;

-- The tenant's account, created on first use, locked, with due grants expired and the plan
-- allowance of the current period granted (lazily: on the first operation of a period).
CREATE FUNCTION tollhouse.credit_account_v1(p_tenant uuid)
RETURNS tollhouse.credit_accounts
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a tollhouse.credit_accounts;
    p tollhouse.plans;
    g record;
    v_changed boolean := false;
    v_months integer;
BEGIN
    SELECT * INTO a FROM tollhouse.credit_accounts WHERE tenant_id = p_tenant FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO tollhouse.credit_accounts
            (tenant_id, plan, overdraft_limit, daily_cap, period_start, period_end)
        SELECT t.id, pl.name, pl.overdraft_limit, pl.daily_cap, now(), now() + interval '1 month'
        FROM tollhouse.tenants t
        LEFT JOIN tollhouse.users u ON u.id = t.owner_user_id AND t.is_default
        JOIN tollhouse.plans pl ON pl.name = coalesce(u.plan_override, 'free')
        WHERE t.id = p_tenant AND t.deleted_at IS NULL
        ON CONFLICT (tenant_id) DO NOTHING;
        SELECT * INTO a FROM tollhouse.credit_accounts WHERE tenant_id = p_tenant FOR UPDATE;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    END IF;

    FOR g IN
        SELECT id, remaining FROM tollhouse.credit_grants
        WHERE tenant_id = p_tenant AND remaining > 0 AND expires_at <= now()
        ORDER BY expires_at, id
        FOR UPDATE
    LOOP
        UPDATE tollhouse.credit_grants SET remaining = 0 WHERE tenant_id = p_tenant AND id = g.id;
        UPDATE tollhouse.credit_accounts SET balance = balance - g.remaining, updated_at = now()
        WHERE tenant_id = p_tenant
        RETURNING * INTO a;
        INSERT INTO tollhouse.credit_ledger
            (tenant_id, id, kind, reason, delta, balance_after, grant_id)
        VALUES (p_tenant, tollhouse.uuid7(), 'expiry', 'expiry', -g.remaining, a.balance, g.id);
        v_changed := true;
    END LOOP;

    -- Reservations past their time are released.
    IF a.reserved > 0 THEN
    WITH gone AS (
        UPDATE tollhouse.credit_reservations r
        SET status = 'expired', resolved_at = now()
        WHERE r.tenant_id = p_tenant AND r.status = 'pending' AND r.expires_at <= now()
        RETURNING r.amount, r.day
    )
    UPDATE tollhouse.credit_accounts c
    SET reserved = c.reserved - (SELECT coalesce(sum(amount), 0) FROM gone),
        daily_used = greatest(0, c.daily_used - (SELECT coalesce(sum(amount), 0) FROM gone
                                                 WHERE gone.day = c.day_start))
    WHERE c.tenant_id = p_tenant AND EXISTS (SELECT 1 FROM gone)
    RETURNING * INTO a;
    IF a.tenant_id IS NULL THEN
        SELECT * INTO a FROM tollhouse.credit_accounts WHERE tenant_id = p_tenant;
    END IF;
    END IF;

    IF now() >= a.period_end THEN
        -- Periods count whole months from the account's creation (no drift: Jan 31 ->
        -- Feb 28 -> Mar 31), and a new period takes the plan's current limits.
        v_months := (extract(year FROM age(now(), a.created_at)) * 12
                     + extract(month FROM age(now(), a.created_at)))::integer;
        a.period_start := a.created_at + make_interval(months => v_months);
        a.period_end := a.created_at + make_interval(months => v_months + 1);
        SELECT * INTO p FROM tollhouse.plans WHERE name = a.plan;
        UPDATE tollhouse.credit_accounts
        SET period_start = a.period_start, period_end = a.period_end,
            daily_cap = p.daily_cap, overdraft_limit = greatest(p.overdraft_limit, -balance),
            updated_at = now()
        WHERE tenant_id = p_tenant;
        v_changed := true;
    END IF;
    IF a.allowance_for IS DISTINCT FROM a.period_start THEN
        SELECT * INTO p FROM tollhouse.plans WHERE name = a.plan;
        IF p.monthly_credits > 0 THEN
            PERFORM tollhouse.credit_apply_grant_v1(
                p_tenant, p.monthly_credits, 'plan',
                'plan:' || a.plan || ':'
                    || to_char(a.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                0, a.period_end, 'grant.plan', NULL);
        END IF;
        UPDATE tollhouse.credit_accounts SET allowance_for = a.period_start
        WHERE tenant_id = p_tenant;
        v_changed := true;
    END IF;
    IF v_changed THEN
        SELECT * INTO a FROM tollhouse.credit_accounts WHERE tenant_id = p_tenant;
    END IF;
    RETURN a;
END
$$;

-- One debit, decided and written in one call. Outcomes, rejections included, are recorded
-- per (tenant, turn_id) and replayed on retry.
-- The locked, up-to-date account of the payer a call names: the tenant, or else the user's
-- personal tenant. NULL when there is none.
CREATE FUNCTION tollhouse.credit_payer_account_v1(p_tenant uuid, p_user uuid)
RETURNS tollhouse.credit_accounts
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant uuid := coalesce(p_tenant, tollhouse.credit_personal_tenant_v1(p_user));
BEGIN
    IF v_tenant IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN tollhouse.credit_account_v1(v_tenant);
END
$$;

-- Claims a turn id for a tenant: false when another tenant has it, or (for a plain debit)
-- when a reservation of this tenant holds it.
CREATE FUNCTION tollhouse.credit_claim_turn_v1(p_turn_id text, p_tenant uuid, p_reserved boolean)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner uuid;
BEGIN
    INSERT INTO tollhouse.credit_turns (turn_id, tenant_id) VALUES (p_turn_id, p_tenant)
    ON CONFLICT (turn_id) DO NOTHING
    RETURNING tenant_id INTO v_owner;
    IF v_owner IS NOT NULL THEN
        RETURN true;
    END IF;
    SELECT tenant_id INTO v_owner FROM tollhouse.credit_turns WHERE turn_id = p_turn_id;
    IF v_owner <> p_tenant THEN
        RETURN false;
    END IF;
    -- Ours already: a reservation's turn may be debited only by committing it.
    RETURN p_reserved OR NOT EXISTS (
        SELECT 1 FROM tollhouse.credit_reservations r
        WHERE r.tenant_id = p_tenant AND r.turn_id = p_turn_id);
END
$$;

CREATE FUNCTION tollhouse.credit_debit_v1(
    p_tenant uuid, p_user uuid, p_amount bigint, p_turn_id text, p_session_id text,
    p_reason text, p_metadata jsonb, p_locked boolean DEFAULT false,
    p_reserved boolean DEFAULT false
) RETURNS tollhouse.credit_debit_result
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant uuid := p_tenant;
    a tollhouse.credit_accounts;
    prior tollhouse.credit_debits;
    g record;
    v_left bigint := p_amount;
    v_take bigint;
    v_ledger uuid;
    v_day date;
    v_code text;
BEGIN
    IF v_tenant IS NULL THEN
        v_tenant := tollhouse.credit_personal_tenant_v1(p_user);
    END IF;
    IF v_tenant IS NOT NULL THEN
        IF p_locked THEN
            -- The batch locked and refreshed this account already; locking again is free.
            SELECT * INTO a FROM tollhouse.credit_accounts WHERE tenant_id = v_tenant FOR UPDATE;
        ELSE
            a := tollhouse.credit_account_v1(v_tenant);
        END IF;
    END IF;
    IF a.tenant_id IS NULL THEN
        RETURN ROW(v_tenant, 'rejected', 'not_found', NULL, p_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;

    SELECT * INTO prior FROM tollhouse.credit_debits
    WHERE tenant_id = v_tenant AND turn_id = p_turn_id;
    IF FOUND THEN
        IF prior.amount <> p_amount THEN
            RETURN ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL, p_amount, NULL,
                       false)::tollhouse.credit_debit_result;
        END IF;
        RETURN ROW(v_tenant, prior.status, prior.code, prior.ledger_id, prior.amount,
                   prior.balance_after, true)::tollhouse.credit_debit_result;
    END IF;
    IF NOT tollhouse.credit_claim_turn_v1(p_turn_id, v_tenant, p_reserved) THEN
        RETURN ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL, p_amount, NULL,
                   false)::tollhouse.credit_debit_result;
    END IF;

    v_day := (now() AT TIME ZONE a.time_zone)::date;
    -- The day only moves forward: a transaction that started before midnight but got the
    -- lock after it counts against the new day instead of wiping it.
    IF a.day_start IS NULL OR v_day > a.day_start THEN
        a.daily_used := 0;
        a.day_start := v_day;
    END IF;
    IF a.daily_cap IS NOT NULL AND a.daily_used + p_amount > a.daily_cap AND NOT p_reserved THEN
        v_code := 'daily_cap_exceeded';
    ELSIF a.balance - a.reserved - p_amount < -a.overdraft_limit THEN
        v_code := 'insufficient_credits';
    END IF;
    IF v_code IS NOT NULL THEN
        UPDATE tollhouse.credit_accounts SET daily_used = a.daily_used, day_start = a.day_start
        WHERE tenant_id = v_tenant;
        INSERT INTO tollhouse.credit_debits (tenant_id, turn_id, amount, status, code)
        VALUES (v_tenant, p_turn_id, p_amount, 'rejected', v_code);
        RETURN ROW(v_tenant, 'rejected', v_code, NULL, p_amount, NULL,
                   false)::tollhouse.credit_debit_result;
    END IF;

    v_ledger := tollhouse.uuid7();
    FOR g IN
        SELECT id, remaining FROM tollhouse.credit_grants
        WHERE tenant_id = v_tenant AND remaining > 0
          AND (expires_at IS NULL OR expires_at > now())
        ORDER BY priority DESC, expires_at ASC NULLS LAST, created_at, id
        FOR UPDATE
    LOOP
        EXIT WHEN v_left = 0;
        v_take := least(v_left, g.remaining);
        UPDATE tollhouse.credit_grants SET remaining = remaining - v_take
        WHERE tenant_id = v_tenant AND id = g.id;
        INSERT INTO tollhouse.credit_ledger_splits (tenant_id, ledger_id, grant_id, amount)
        VALUES (v_tenant, v_ledger, g.id, v_take);
        v_left := v_left - v_take;
    END LOOP;
    -- What no grant covered is overdraft: the balance goes below zero, within the limit the
    -- check above and the floor constraint allow.
    a.balance := a.balance - p_amount;
    UPDATE tollhouse.credit_accounts
    SET balance = a.balance, daily_used = a.daily_used + p_amount, day_start = a.day_start,
        updated_at = now()
    WHERE tenant_id = v_tenant;
    INSERT INTO tollhouse.credit_ledger
        (tenant_id, id, kind, reason, delta, balance_after, turn_id, session_id,
         acting_user_id, metadata)
    VALUES (v_tenant, v_ledger, 'debit', p_reason, -p_amount, a.balance, p_turn_id,
            p_session_id, p_user, coalesce(p_metadata, '{}'::jsonb));
    INSERT INTO tollhouse.credit_debits
        (tenant_id, turn_id, amount, status, ledger_id, balance_after)
    VALUES (v_tenant, p_turn_id, p_amount, 'applied', v_ledger, a.balance);
    RETURN ROW(v_tenant, 'applied', NULL, v_ledger, p_amount, a.balance,
               false)::tollhouse.credit_debit_result;
END
$$;

-- Many debits in one transaction (group commit), decided set-wise per tenant: each account
-- is locked once (in tenant order, so batchers never deadlock) and its live grants read once;
-- the debits are then decided one by one in array order, exactly as credit_debit_v1 would
-- decide them, in variables; and each table is written once per tenant. (Updating one row
-- many times in one transaction makes PostgreSQL walk ever longer version chains.)
CREATE FUNCTION tollhouse.credit_debit_batch_v1(
    p_tenants uuid[], p_users uuid[], p_amounts bigint[], p_turn_ids text[],
    p_session_ids text[], p_reasons text[], p_metadata jsonb[]
) RETURNS SETOF tollhouse.credit_debit_result
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer := coalesce(array_length(p_amounts, 1), 0);
    v_tenants uuid[] := p_tenants;
    results tollhouse.credit_debit_result[];
    v_tenant uuid;
    a tollhouse.credit_accounts;
    prior tollhouse.credit_debits;
    v_day date;
    v_code text;
    i integer;
    j integer;
    k integer;
    v_left bigint;
    v_take bigint;
    v_ledger uuid;
    -- the tenant's live grants, in consumption order
    g_ids uuid[];
    g_rem bigint[];
    g_orig bigint[];
    -- rows to write for the tenant
    l_ids uuid[];
    l_deltas bigint[];
    l_after bigint[];
    l_turns text[];
    l_sessions text[];
    l_users uuid[];
    l_reasons text[];
    l_meta jsonb[];
    s_ledger uuid[];
    s_grant uuid[];
    s_amount bigint[];
    d_turns text[];
    d_amounts bigint[];
    d_status text[];
    d_codes text[];
    d_ledger uuid[];
    d_after bigint[];
    -- per-row tenants of the rows above, and the accounts and grants to write back
    l_tenants uuid[] := '{}';
    s_tenants uuid[] := '{}';
    d_tenants uuid[] := '{}';
    a_ids uuid[] := '{}';
    a_balance bigint[] := '{}';
    a_daily bigint[] := '{}';
    a_day date[] := '{}';
    w_tenants uuid[] := '{}';
    w_ids uuid[] := '{}';
    w_rem bigint[] := '{}';
    w_orig bigint[] := '{}';
    v_first integer;
    v_known uuid[] := '{}';
    claim_ok boolean[];
BEGIN
    l_ids := '{}'; l_deltas := '{}'; l_after := '{}'; l_turns := '{}'; l_sessions := '{}';
    l_users := '{}'; l_reasons := '{}'; l_meta := '{}';
    s_ledger := '{}'; s_grant := '{}'; s_amount := '{}';
    d_turns := '{}'; d_amounts := '{}'; d_status := '{}'; d_codes := '{}';
    d_ledger := '{}'; d_after := '{}';
    results := array_fill(NULL::tollhouse.credit_debit_result, ARRAY[greatest(n, 1)]);
    FOR i IN 1 .. n LOOP
        IF v_tenants[i] IS NULL THEN
            v_tenants[i] := tollhouse.credit_personal_tenant_v1(p_users[i]);
        END IF;
    END LOOP;

    -- 1. Every account locked (and brought up to date) in tenant order, before anything else
    --    is written: two batches, or a batch and a single debit, cannot wait on each other.
    FOR v_tenant IN
        SELECT DISTINCT x FROM unnest(v_tenants[1:n]) AS x WHERE x IS NOT NULL ORDER BY x
    LOOP
        a := tollhouse.credit_account_v1(v_tenant);
        IF a.tenant_id IS NOT NULL THEN
            v_known := v_known || v_tenant;
        END IF;
    END LOOP;
    -- 2. Turn ids claimed in array order (sorted by turn id, then position, for a global key
    --    order): of two tenants sending one new turn id, the earlier debit gets it, as one at
    --    a time.
    claim_ok := array_fill(false, ARRAY[greatest(n, 1)]);
    FOR i IN
        SELECT x.i FROM generate_series(1, n) AS x(i)
        WHERE v_tenants[x.i] = ANY(v_known)
        ORDER BY p_turn_ids[x.i], x.i
    LOOP
        claim_ok[i] := tollhouse.credit_claim_turn_v1(p_turn_ids[i], v_tenants[i], false);
    END LOOP;
    -- 3. Decided per tenant, in array order.
    FOREACH v_tenant IN ARRAY v_known LOOP
        SELECT * INTO a FROM tollhouse.credit_accounts WHERE tenant_id = v_tenant;
        SELECT array_agg(id ORDER BY priority DESC, expires_at ASC NULLS LAST, created_at, id),
               array_agg(remaining ORDER BY priority DESC, expires_at ASC NULLS LAST,
                         created_at, id)
        INTO g_ids, g_rem
        FROM (SELECT g.id, g.remaining, g.priority, g.expires_at, g.created_at
              FROM tollhouse.credit_grants g
              WHERE g.tenant_id = v_tenant AND g.remaining > 0
                AND (g.expires_at IS NULL OR g.expires_at > now())
              FOR UPDATE) live;
        g_orig := g_rem;
        v_first := coalesce(array_length(d_turns, 1), 0) + 1;  -- this tenant's outcomes
        v_day := (now() AT TIME ZONE a.time_zone)::date;
        IF a.day_start IS NULL OR v_day > a.day_start THEN
            a.daily_used := 0;
            a.day_start := v_day;
        END IF;

        FOR i IN 1 .. n LOOP
            CONTINUE WHEN v_tenants[i] IS DISTINCT FROM v_tenant;
            -- A turn decided earlier in this batch, or before it: its first outcome again.
            k := array_position(d_turns, p_turn_ids[i], v_first);
            IF k IS NOT NULL THEN
                IF d_amounts[k] <> p_amounts[i] THEN
                    results[i] := ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL,
                                      p_amounts[i], NULL, false);
                ELSE
                    results[i] := ROW(v_tenant, d_status[k], d_codes[k], d_ledger[k],
                                      d_amounts[k], d_after[k], true);
                END IF;
                CONTINUE;
            END IF;
            SELECT * INTO prior FROM tollhouse.credit_debits d
            WHERE d.tenant_id = v_tenant AND d.turn_id = p_turn_ids[i];
            IF FOUND THEN
                IF prior.amount <> p_amounts[i] THEN
                    results[i] := ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL,
                                      p_amounts[i], NULL, false);
                ELSE
                    results[i] := ROW(v_tenant, prior.status, prior.code, prior.ledger_id,
                                      prior.amount, prior.balance_after, true);
                END IF;
                CONTINUE;
            END IF;
            IF NOT claim_ok[i] THEN
                results[i] := ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL,
                                  p_amounts[i], NULL, false);
                CONTINUE;
            END IF;

            v_code := NULL;
            IF a.daily_cap IS NOT NULL AND a.daily_used + p_amounts[i] > a.daily_cap THEN
                v_code := 'daily_cap_exceeded';
            ELSIF a.balance - a.reserved - p_amounts[i] < -a.overdraft_limit THEN
                v_code := 'insufficient_credits';
            END IF;
            IF v_code IS NOT NULL THEN
                d_tenants := d_tenants || v_tenant;
                d_turns := d_turns || p_turn_ids[i]; d_amounts := d_amounts || p_amounts[i];
                d_status := d_status || 'rejected'::text; d_codes := d_codes || v_code;
                d_ledger := d_ledger || NULL::uuid; d_after := d_after || NULL::bigint;
                results[i] := ROW(v_tenant, 'rejected', v_code, NULL, p_amounts[i], NULL, false);
                CONTINUE;
            END IF;

            v_ledger := tollhouse.uuid7();
            v_left := p_amounts[i];
            FOR j IN 1 .. coalesce(array_length(g_ids, 1), 0) LOOP
                EXIT WHEN v_left = 0;
                CONTINUE WHEN g_rem[j] = 0;
                v_take := least(v_left, g_rem[j]);
                g_rem[j] := g_rem[j] - v_take;
                v_left := v_left - v_take;
                s_tenants := s_tenants || v_tenant;
                s_ledger := s_ledger || v_ledger; s_grant := s_grant || g_ids[j];
                s_amount := s_amount || v_take;
            END LOOP;
            a.balance := a.balance - p_amounts[i];
            a.daily_used := a.daily_used + p_amounts[i];
            l_tenants := l_tenants || v_tenant;
            l_ids := l_ids || v_ledger; l_deltas := l_deltas || (-p_amounts[i]);
            l_after := l_after || a.balance; l_turns := l_turns || p_turn_ids[i];
            l_sessions := l_sessions || p_session_ids[i]; l_users := l_users || p_users[i];
            l_reasons := l_reasons || p_reasons[i];
            l_meta := l_meta || coalesce(nullif(p_metadata[i], 'null'::jsonb), '{}'::jsonb);
            d_tenants := d_tenants || v_tenant;
            d_turns := d_turns || p_turn_ids[i]; d_amounts := d_amounts || p_amounts[i];
            d_status := d_status || 'applied'::text; d_codes := d_codes || NULL::text;
            d_ledger := d_ledger || v_ledger; d_after := d_after || a.balance;
            results[i] := ROW(v_tenant, 'applied', NULL, v_ledger, p_amounts[i], a.balance, false);
        END LOOP;

        a_ids := a_ids || v_tenant; a_balance := a_balance || a.balance;
        a_daily := a_daily || a.daily_used; a_day := a_day || a.day_start;
        FOR j IN 1 .. coalesce(array_length(g_ids, 1), 0) LOOP
            IF g_rem[j] <> g_orig[j] THEN
                w_tenants := w_tenants || v_tenant; w_ids := w_ids || g_ids[j];
                w_rem := w_rem || g_rem[j];
            END IF;
        END LOOP;
    END LOOP;

    -- Each table written once for the whole batch.
    UPDATE tollhouse.credit_accounts c
    SET balance = u.balance, daily_used = u.daily, day_start = u.day, updated_at = now()
    FROM unnest(a_ids, a_balance, a_daily, a_day) AS u(tenant_id, balance, daily, day)
    WHERE c.tenant_id = u.tenant_id;
    UPDATE tollhouse.credit_grants g SET remaining = u.rem
    FROM unnest(w_tenants, w_ids, w_rem) AS u(tenant_id, id, rem)
    WHERE g.tenant_id = u.tenant_id AND g.id = u.id;
    INSERT INTO tollhouse.credit_ledger
        (tenant_id, id, kind, reason, delta, balance_after, turn_id, session_id,
         acting_user_id, metadata)
    SELECT u.tenant_id, u.id, 'debit', u.reason, u.delta, u.after, u.turn, u.session, u.usr,
           u.meta
    FROM unnest(l_tenants, l_ids, l_reasons, l_deltas, l_after, l_turns, l_sessions, l_users,
                l_meta)
         AS u(tenant_id, id, reason, delta, after, turn, session, usr, meta);
    INSERT INTO tollhouse.credit_ledger_splits (tenant_id, ledger_id, grant_id, amount)
    SELECT u.tenant_id, u.ledger, u.grant_id, sum(u.amount)
    FROM unnest(s_tenants, s_ledger, s_grant, s_amount) AS u(tenant_id, ledger, grant_id, amount)
    GROUP BY u.tenant_id, u.ledger, u.grant_id;
    INSERT INTO tollhouse.credit_debits
        (tenant_id, turn_id, amount, status, code, ledger_id, balance_after)
    SELECT u.tenant_id, u.turn, u.amount, u.status, u.code, u.ledger, u.after
    FROM unnest(d_tenants, d_turns, d_amounts, d_status, d_codes, d_ledger, d_after)
         AS u(tenant_id, turn, amount, status, code, ledger, after);

    FOR i IN 1 .. n LOOP
        IF results[i] IS NULL THEN
            results[i] := ROW(v_tenants[i], 'rejected', 'not_found', NULL, p_amounts[i], NULL,
                              false);
        END IF;
        RETURN NEXT results[i];
    END LOOP;
END
$$;

-- A grant, idempotent per (tenant, source, source_id).
CREATE FUNCTION tollhouse.credit_grant_v1(
    p_tenant uuid, p_user uuid, p_amount bigint, p_source text, p_source_id text,
    p_priority integer, p_expires_at timestamptz
) RETURNS TABLE (tenant_id uuid, grant_id uuid, balance_after bigint, replayed boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant uuid;
    a tollhouse.credit_accounts;
    v_existing tollhouse.credit_grants;
    v_grant uuid;
BEGIN
    a := tollhouse.credit_payer_account_v1(p_tenant, p_user);
    v_tenant := coalesce(a.tenant_id, p_tenant);
    IF a.tenant_id IS NULL THEN
        RETURN;
    END IF;
    IF p_source_id IS NOT NULL THEN
        SELECT * INTO v_existing FROM tollhouse.credit_grants g
        WHERE g.tenant_id = v_tenant AND g.source = p_source AND g.source_id = p_source_id;
        IF FOUND THEN
            IF v_existing.total <> p_amount THEN
                RAISE EXCEPTION 'grant % exists with another amount', p_source_id
                    USING ERRCODE = 'unique_violation', CONSTRAINT = 'credit_grants_source_key';
            END IF;
            RETURN QUERY
                SELECT v_tenant, v_existing.id, l.balance_after, true
                FROM tollhouse.credit_ledger l
                WHERE l.tenant_id = v_tenant AND l.grant_id = v_existing.id AND l.kind = 'grant';
            RETURN;
        END IF;
    END IF;
    v_grant := tollhouse.credit_apply_grant_v1(
        v_tenant, p_amount, p_source, p_source_id, p_priority, p_expires_at,
        'grant.' || p_source, p_user);
    RETURN QUERY
        SELECT v_tenant, v_grant, c.balance, false
        FROM tollhouse.credit_accounts c WHERE c.tenant_id = v_tenant;
END
$$;

-- Reserve up to p_amount for a turn: counts against the available balance and the cap.
CREATE FUNCTION tollhouse.credit_reserve_v1(
    p_tenant uuid, p_user uuid, p_amount bigint, p_turn_id text, p_ttl_seconds integer,
    p_session_id text
) RETURNS tollhouse.credit_debit_result
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant uuid;
    a tollhouse.credit_accounts;
    prior tollhouse.credit_reservations;
    v_day date;
    v_code text;
BEGIN
    a := tollhouse.credit_payer_account_v1(p_tenant, p_user);
    v_tenant := coalesce(a.tenant_id, p_tenant);
    IF a.tenant_id IS NULL THEN
        RETURN ROW(v_tenant, 'rejected', 'not_found', NULL, p_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    SELECT * INTO prior FROM tollhouse.credit_reservations
    WHERE tenant_id = v_tenant AND turn_id = p_turn_id;
    IF FOUND THEN
        IF prior.amount <> p_amount THEN
            RETURN ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL, p_amount, NULL, false)::tollhouse.credit_debit_result;
        END IF;
        RETURN ROW(v_tenant, 'pending', NULL, NULL, prior.amount,
                   prior.available_after, true)::tollhouse.credit_debit_result;
    END IF;
    -- A turn already debited (or another tenant's) cannot be reserved.
    IF EXISTS (SELECT 1 FROM tollhouse.credit_debits d
               WHERE d.tenant_id = v_tenant AND d.turn_id = p_turn_id)
       OR NOT tollhouse.credit_claim_turn_v1(p_turn_id, v_tenant, true) THEN
        RETURN ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL, p_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    v_day := (now() AT TIME ZONE a.time_zone)::date;
    -- The day only moves forward: a transaction that started before midnight but got the
    -- lock after it counts against the new day instead of wiping it.
    IF a.day_start IS NULL OR v_day > a.day_start THEN
        a.daily_used := 0;
        a.day_start := v_day;
    END IF;
    IF a.daily_cap IS NOT NULL AND a.daily_used + p_amount > a.daily_cap THEN
        v_code := 'daily_cap_exceeded';
    ELSIF a.balance - a.reserved - p_amount < -a.overdraft_limit THEN
        v_code := 'insufficient_credits';
    END IF;
    IF v_code IS NOT NULL THEN
        RETURN ROW(v_tenant, 'rejected', v_code, NULL, p_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    UPDATE tollhouse.credit_accounts
    SET reserved = reserved + p_amount, daily_used = a.daily_used + p_amount,
        day_start = a.day_start, updated_at = now()
    WHERE tenant_id = v_tenant;
    INSERT INTO tollhouse.credit_reservations
        (tenant_id, turn_id, amount, day, expires_at, acting_user_id, session_id,
         available_after)
    VALUES (v_tenant, p_turn_id, p_amount, a.day_start,
            now() + make_interval(secs => p_ttl_seconds), p_user, p_session_id,
            a.balance - a.reserved - p_amount);
    RETURN ROW(v_tenant, 'pending', NULL, NULL, p_amount,
               a.balance - a.reserved - p_amount, false)::tollhouse.credit_debit_result;
END
$$;

-- Commit (with the actual amount, at most the reserved one) or release a reservation.
-- Exactly one resolution wins; the others see it resolved.
CREATE FUNCTION tollhouse.credit_resolve_v1(
    p_tenant uuid, p_user uuid, p_turn_id text, p_commit_amount bigint, p_reason text,
    p_metadata jsonb
) RETURNS tollhouse.credit_debit_result
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant uuid;
    a tollhouse.credit_accounts;
    r tollhouse.credit_reservations;
    v_result tollhouse.credit_debit_result;
BEGIN
    a := tollhouse.credit_payer_account_v1(p_tenant, p_user);
    v_tenant := coalesce(a.tenant_id, p_tenant);
    IF a.tenant_id IS NULL THEN
        RETURN ROW(v_tenant, 'rejected', 'not_found', NULL, p_commit_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    SELECT * INTO r FROM tollhouse.credit_reservations
    WHERE tenant_id = v_tenant AND turn_id = p_turn_id;
    IF NOT FOUND THEN
        RETURN ROW(v_tenant, 'rejected', 'reservation_not_found', NULL, p_commit_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    IF r.status <> 'pending' THEN
        IF r.status = 'committed' AND p_commit_amount IS NOT DISTINCT FROM r.committed_amount THEN
            SELECT tenant_id, status, code, ledger_id, amount, balance_after, true
            INTO v_result FROM tollhouse.credit_debits
            WHERE tenant_id = v_tenant AND turn_id = p_turn_id;
            IF FOUND THEN
                RETURN v_result;
            END IF;
            RETURN ROW(v_tenant, 'committed', NULL, NULL, 0, a.balance, true)::tollhouse.credit_debit_result;
        END IF;
        IF r.status = 'released' AND p_commit_amount IS NULL THEN
            RETURN ROW(v_tenant, 'released', NULL, NULL, r.amount, a.balance, true)::tollhouse.credit_debit_result;
        END IF;
        RETURN ROW(v_tenant, 'rejected', 'reservation_' || r.status, NULL, p_commit_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    IF p_commit_amount IS NOT NULL AND (p_commit_amount < 0 OR p_commit_amount > r.amount) THEN
        RETURN ROW(v_tenant, 'rejected', 'commit_exceeds_reservation', NULL, p_commit_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    -- Credits under a hold may have expired meanwhile: a commit the balance can no longer
    -- cover is refused and the hold stays pending (nothing recorded, nothing burned), so the
    -- app can top up and commit again, or release.
    IF p_commit_amount IS NOT NULL
       AND a.balance - (a.reserved - r.amount) - p_commit_amount < -a.overdraft_limit THEN
        RETURN ROW(v_tenant, 'rejected', 'insufficient_credits', NULL, p_commit_amount, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    -- Give the hold back, then (on commit) debit the actual amount as an ordinary debit of
    -- this turn: the hold guaranteed the funds and the cap.
    UPDATE tollhouse.credit_accounts
    SET reserved = reserved - r.amount,
        daily_used = CASE WHEN day_start = r.day THEN greatest(0, daily_used - r.amount)
                          ELSE daily_used END,
        updated_at = now()
    WHERE tenant_id = v_tenant;
    UPDATE tollhouse.credit_reservations
    SET status = CASE WHEN p_commit_amount IS NULL THEN 'released' ELSE 'committed' END,
        committed_amount = p_commit_amount, resolved_at = now()
    WHERE tenant_id = v_tenant AND turn_id = p_turn_id;
    IF p_commit_amount IS NULL THEN
        SELECT balance INTO a.balance FROM tollhouse.credit_accounts WHERE tenant_id = v_tenant;
        RETURN ROW(v_tenant, 'released', NULL, NULL, r.amount, a.balance, false)::tollhouse.credit_debit_result;
    END IF;
    IF p_commit_amount = 0 THEN
        RETURN ROW(v_tenant, 'committed', NULL, NULL, 0, a.balance, false)::tollhouse.credit_debit_result;
    END IF;
    RETURN tollhouse.credit_debit_v1(v_tenant, coalesce(p_user, r.acting_user_id),
                                     p_commit_amount, p_turn_id, r.session_id,
                                     p_reason, p_metadata, true, true);
END
$$;

-- Refund a debit so that `p_total` of it has been refunded in all (idempotent: the same
-- total again changes nothing). The credits come back as a refund grant.
CREATE FUNCTION tollhouse.credit_refund_v1(p_ledger_id uuid, p_total bigint, p_user uuid)
RETURNS TABLE (tenant_id uuid, refunded bigint, balance_after bigint, code text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    d tollhouse.credit_ledger;
    a tollhouse.credit_accounts;
    v_done bigint;
    v_total bigint;
BEGIN
    SELECT * INTO d FROM tollhouse.credit_ledger l WHERE l.id = p_ledger_id AND l.kind = 'debit';
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::uuid, 0::bigint, NULL::bigint, 'ledger_entry_not_found'::text;
        RETURN;
    END IF;
    a := tollhouse.credit_account_v1(d.tenant_id);
    v_total := coalesce(p_total, -d.delta);
    IF v_total <= 0 OR v_total > -d.delta THEN
        RETURN QUERY SELECT d.tenant_id, 0::bigint, a.balance, 'refund_exceeds_debit'::text;
        RETURN;
    END IF;
    SELECT r.refunded INTO v_done FROM tollhouse.credit_refunds r
    WHERE r.tenant_id = d.tenant_id AND r.ledger_id = d.id FOR UPDATE;
    v_done := coalesce(v_done, 0);
    IF v_total > v_done THEN
        PERFORM tollhouse.credit_apply_grant_v1(
            d.tenant_id, v_total - v_done, 'refund', 'refund:' || d.id || ':' || v_total, 0,
            NULL, 'refund', p_user, 'refund');
        INSERT INTO tollhouse.credit_refunds AS r (tenant_id, ledger_id, refunded)
        VALUES (d.tenant_id, d.id, v_total)
        ON CONFLICT (tenant_id, ledger_id) DO UPDATE SET refunded = excluded.refunded,
                                                          updated_at = now();
        v_done := v_total;
    END IF;
    RETURN QUERY
        SELECT d.tenant_id, v_done, c.balance, NULL::text
        FROM tollhouse.credit_accounts c WHERE c.tenant_id = d.tenant_id;
END
$$;

-- Count `p_amount` of a metric in the current window, only if the total stays within
-- `p_limit`: one statement checks and writes.
CREATE FUNCTION tollhouse.usage_increment_v1(
    p_tenant uuid, p_metric text, p_window interval, p_amount bigint, p_limit bigint
) RETURNS TABLE (allowed boolean, used bigint, window_start timestamptz)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_start timestamptz := date_bin(p_window, now(), timestamptz '2000-01-01 00:00:00+00');
    v_used bigint;
BEGIN
    IF p_amount > p_limit THEN
        SELECT c.used INTO v_used FROM tollhouse.usage_counters c
        WHERE c.tenant_id = p_tenant AND c.metric = p_metric AND c.window_start = v_start;
        RETURN QUERY SELECT false, coalesce(v_used, 0), v_start;
        RETURN;
    END IF;
    INSERT INTO tollhouse.usage_counters AS c (tenant_id, metric, window_start, used)
    VALUES (p_tenant, p_metric, v_start, p_amount)
    ON CONFLICT (tenant_id, metric, window_start) DO UPDATE
        SET used = c.used + p_amount
        WHERE c.used + p_amount <= p_limit
    RETURNING c.used INTO v_used;
    IF v_used IS NULL THEN
        SELECT c.used INTO v_used FROM tollhouse.usage_counters c
        WHERE c.tenant_id = p_tenant AND c.metric = p_metric AND c.window_start = v_start;
        RETURN QUERY SELECT false, v_used, v_start;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, v_used, v_start;
END
$$;

-- Moves an account to another plan mid-period, keeping the period's usage: what is left of
-- the old allowance expires, and the new plan grants its allowance minus what the period
-- already used of the old one. Limits change at once.
CREATE FUNCTION tollhouse.credit_change_plan_v1(p_tenant uuid, p_user uuid, p_plan text)
RETURNS TABLE (tenant_id uuid, plan text, balance_after bigint, changed boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant uuid;
    a tollhouse.credit_accounts;
    p tollhouse.plans;
    g tollhouse.credit_grants;
    v_used bigint := 0;
    v_new bigint;
BEGIN
    a := tollhouse.credit_payer_account_v1(p_tenant, p_user);
    v_tenant := coalesce(a.tenant_id, p_tenant);
    IF a.tenant_id IS NULL THEN
        RETURN;
    END IF;
    SELECT * INTO p FROM tollhouse.plans pl WHERE pl.name = p_plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no plan %', p_plan USING ERRCODE = 'foreign_key_violation',
            CONSTRAINT = 'credit_accounts_plan_fkey';
    END IF;
    IF a.plan = p_plan THEN
        RETURN QUERY SELECT v_tenant, a.plan, a.balance, false;
        RETURN;
    END IF;
    -- The allowance of this period (from the old plan): what it used stays used.
    FOR g IN
        SELECT * FROM tollhouse.credit_grants cg
        WHERE cg.tenant_id = v_tenant AND cg.source = 'plan'
          AND cg.expires_at = a.period_end AND cg.remaining >= 0
        FOR UPDATE
    LOOP
        -- Used: what left the grant other than by expiring (a debt repaid counts as used).
        v_used := v_used + g.total - g.remaining - coalesce((
            SELECT -sum(l.delta) FROM tollhouse.credit_ledger l
            WHERE l.tenant_id = v_tenant AND l.grant_id = g.id AND l.kind = 'expiry'), 0);
        IF g.remaining > 0 THEN
            UPDATE tollhouse.credit_grants cg SET remaining = 0
            WHERE cg.tenant_id = v_tenant AND cg.id = g.id;
            UPDATE tollhouse.credit_accounts c
            SET balance = c.balance - g.remaining, updated_at = now()
            WHERE c.tenant_id = v_tenant
            RETURNING * INTO a;
            INSERT INTO tollhouse.credit_ledger
                (tenant_id, id, kind, reason, delta, balance_after, acting_user_id, grant_id)
            VALUES (v_tenant, tollhouse.uuid7(), 'expiry', 'plan_change', -g.remaining,
                    a.balance, p_user, g.id);
        END IF;
    END LOOP;
    v_new := greatest(0, p.monthly_credits - v_used);
    IF v_new > 0 THEN
        PERFORM tollhouse.credit_apply_grant_v1(
            v_tenant, v_new, 'plan', 'plan-change:' || tollhouse.uuid7(), 0, a.period_end,
            'grant.plan', p_user);
    END IF;
    UPDATE tollhouse.credit_accounts c
    SET plan = p.name, daily_cap = p.daily_cap,
        overdraft_limit = greatest(p.overdraft_limit, -c.balance), updated_at = now()
    WHERE c.tenant_id = v_tenant;
    RETURN QUERY
        SELECT v_tenant, p.name, c.balance, true
        FROM tollhouse.credit_accounts c WHERE c.tenant_id = v_tenant;
END
$$;

-- Row-level security and grants --------------------------------------------------------------

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'plans', 'credit_accounts', 'credit_grants', 'credit_ledger', 'credit_ledger_splits',
        'credit_debits', 'credit_reservations', 'credit_refunds', 'usage_counters',
        'credit_turns'
    ] LOOP
        EXECUTE format('ALTER TABLE tollhouse.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE tollhouse.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY %I ON tollhouse.%I TO tollhouse_service USING (true) WITH CHECK (true)',
            t || '_service', t);
    END LOOP;
END
$$;

GRANT SELECT, INSERT, UPDATE ON tollhouse.plans, tollhouse.credit_accounts,
    tollhouse.credit_grants TO tollhouse_service;
GRANT SELECT, INSERT, UPDATE ON tollhouse.credit_debits, tollhouse.credit_reservations,
    tollhouse.credit_refunds, tollhouse.usage_counters TO tollhouse_service;
GRANT SELECT, INSERT ON tollhouse.credit_turns TO tollhouse_service;
-- Append-only: no UPDATE, no DELETE for anyone but the owner.
GRANT SELECT, INSERT ON tollhouse.credit_ledger, tollhouse.credit_ledger_splits
    TO tollhouse_service;

-- End users read their tenants' accounts, grants and ledger; plans are public to them.
CREATE POLICY plans_read ON tollhouse.plans FOR SELECT TO tollhouse_user USING (true);
GRANT SELECT ON tollhouse.plans TO tollhouse_user;
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['credit_accounts', 'credit_grants', 'credit_ledger',
                             'credit_reservations', 'usage_counters'] LOOP
        EXECUTE format(
            'CREATE POLICY %I ON tollhouse.%I FOR SELECT TO tollhouse_user USING ('
            'EXISTS (SELECT 1 FROM tollhouse.tenant_members m WHERE m.tenant_id = %I.tenant_id'
            ' AND m.user_id = (SELECT tollhouse.current_user_id())))',
            t || '_member_read', t, t);
        EXECUTE format('GRANT SELECT ON tollhouse.%I TO tollhouse_user', t);
    END LOOP;
END
$$;

DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'tollhouse.credit_apply_grant_v1(uuid, bigint, text, text, integer, timestamptz, text, uuid, text)',
        'tollhouse.credit_account_v1(uuid)',
        'tollhouse.credit_debit_v1(uuid, uuid, bigint, text, text, text, jsonb, boolean, boolean)',
        'tollhouse.credit_claim_turn_v1(text, uuid, boolean)',
        'tollhouse.credit_personal_tenant_v1(uuid)',
        'tollhouse.credit_payer_account_v1(uuid, uuid)',
        'tollhouse.credit_change_plan_v1(uuid, uuid, text)',
        'tollhouse.credit_debit_batch_v1(uuid[], uuid[], bigint[], text[], text[], text[], jsonb[])',
        'tollhouse.credit_grant_v1(uuid, uuid, bigint, text, text, integer, timestamptz)',
        'tollhouse.credit_reserve_v1(uuid, uuid, bigint, text, integer, text)',
        'tollhouse.credit_resolve_v1(uuid, uuid, text, bigint, text, jsonb)',
        'tollhouse.credit_refund_v1(uuid, bigint, uuid)',
        'tollhouse.usage_increment_v1(uuid, text, interval, bigint, bigint)'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tollhouse_service', f);
    END LOOP;
END
$$;
