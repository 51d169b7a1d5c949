-- Organisations: tenants get a slug, a logo and soft delete; members keep at least one
-- owner; invitations store only a hash of their token; a member's debit against the pool
-- checks and counts the member's credit limit in the same call. RLS enabled and forced.

ALTER TABLE tollhouse.tenants
    ADD COLUMN slug text,
    ADD COLUMN logo_url text,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT tenants_slug_check
        CHECK (slug ~ '^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$' AND slug !~ '--'),
    ADD CONSTRAINT tenants_logo_url_check
        CHECK (char_length(logo_url) <= 2000 AND logo_url ~ '^https?://[^[:space:]]+$'),
    -- An organisation has a slug; a personal tenant may not.
    ADD CONSTRAINT tenants_org_slug_check CHECK (is_default OR slug IS NOT NULL),
    ADD CONSTRAINT tenants_name_blank_check CHECK (btrim(name) <> '');
-- A slug stays taken while its organisation is soft-deleted, so a restore cannot collide.
CREATE UNIQUE INDEX tenants_slug_key ON tollhouse.tenants (slug);

ALTER TABLE tollhouse.tenant_members ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- What each member of an organisation may spend from its pool per period, and has spent.
CREATE TABLE tollhouse.tenant_member_credit_limits (
    tenant_id uuid NOT NULL,
    user_id uuid NOT NULL,
    credit_limit bigint NOT NULL DEFAULT -1,
    used_credits bigint NOT NULL DEFAULT 0,
    period_start timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenant_member_credit_limits_pkey PRIMARY KEY (tenant_id, user_id),
    -- Removing a member removes its limit, and waits for any debit holding that row.
    CONSTRAINT tenant_member_credit_limits_member_fkey FOREIGN KEY (tenant_id, user_id)
        REFERENCES tollhouse.tenant_members (tenant_id, user_id) ON DELETE CASCADE,
    -- -1 = unlimited. A limit may be set below what was used (spending then stops).
    CONSTRAINT tenant_member_credit_limits_limit_check CHECK (credit_limit >= -1),
    CONSTRAINT tenant_member_credit_limits_used_check CHECK (used_credits >= 0)
);

CREATE TABLE tollhouse.tenant_invitations (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id),
    id uuid NOT NULL,
    email text NOT NULL,
    role text NOT NULL,
    credit_limit bigint NOT NULL DEFAULT -1,
    invited_by uuid,
    selector uuid NOT NULL,
    secret_hash bytea NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    accepted_at timestamptz,
    accepted_by uuid,
    CONSTRAINT tenant_invitations_pkey PRIMARY KEY (tenant_id, id),
    CONSTRAINT tenant_invitations_email_check
        CHECK (email = lower(btrim(email)) AND char_length(email) BETWEEN 3 AND 320),
    CONSTRAINT tenant_invitations_role_check CHECK (role IN ('admin', 'member')),
    CONSTRAINT tenant_invitations_status_check
        CHECK (status IN ('pending', 'accepted', 'revoked', 'expired')),
    CONSTRAINT tenant_invitations_credit_limit_check CHECK (credit_limit >= -1),
    CONSTRAINT tenant_invitations_secret_hash_check CHECK (octet_length(secret_hash) = 32)
);
-- One live invitation per address and organisation: inviting again replaces it.
CREATE UNIQUE INDEX tenant_invitations_pending_key ON tollhouse.tenant_invitations
    (tenant_id, email) WHERE status = 'pending';

-- Global lookup of an invitation by its token's selector (rotated on resend).
CREATE TABLE tollhouse.invitation_routes (
    selector uuid NOT NULL,
    tenant_id uuid NOT NULL,
    invitation_id uuid NOT NULL,
    CONSTRAINT invitation_routes_pkey PRIMARY KEY (selector)
);

-- A personal tenant has one member: its owner. Checked once per statement over the rows it
-- wrote (a bulk import inserts thousands at a time).
CREATE FUNCTION tollhouse.tenant_members_personal_check() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM written_members n JOIN tollhouse.tenants t ON t.id = n.tenant_id
               WHERE t.is_default AND (t.owner_user_id <> n.user_id OR n.role <> 'owner')) THEN
        RAISE EXCEPTION 'a personal tenant has no other members'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_members_personal_check';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tenant_members_personal_check AFTER INSERT ON tollhouse.tenant_members
    REFERENCING NEW TABLE AS written_members
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.tenant_members_personal_check();
CREATE TRIGGER tenant_members_personal_check_update AFTER UPDATE ON tollhouse.tenant_members
    REFERENCING NEW TABLE AS written_members
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.tenant_members_personal_check();

-- Every member of an organisation has a limit row (unlimited until set): the debit locks it.
CREATE FUNCTION tollhouse.tenant_members_limit_row() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO tollhouse.tenant_member_credit_limits (tenant_id, user_id)
    SELECT n.tenant_id, n.user_id
    FROM written_members n JOIN tollhouse.tenants t ON t.id = n.tenant_id AND NOT t.is_default
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER tenant_members_limit_row AFTER INSERT ON tollhouse.tenant_members
    REFERENCING NEW TABLE AS written_members
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.tenant_members_limit_row();

-- An organisation keeps at least one owner (a live user), a personal tenant keeps its owner,
-- and the owner of record follows when it stops being an owner. The tenant row is written
-- first, so concurrent demotions and removals queue on it (and fail to serialize under
-- REPEATABLE READ), and the count then sees every committed change. SECURITY DEFINER: the
-- rule holds whoever writes, an end user under row-level security included.
CREATE FUNCTION tollhouse.tenant_members_owner_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
BEGIN
    UPDATE tollhouse.tenants SET updated_at = now() WHERE id = OLD.tenant_id
    RETURNING is_default, owner_user_id INTO t;
    IF NOT FOUND THEN
        RETURN NULL;  -- the tenant itself is being deleted
    END IF;
    IF t.is_default THEN
        RAISE EXCEPTION 'a personal tenant keeps its owner'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_members_personal_check';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM tollhouse.tenant_members m
                   JOIN tollhouse.users u ON u.id = m.user_id
                   WHERE m.tenant_id = OLD.tenant_id AND m.role = 'owner'
                     AND u.deleted_at IS NULL) THEN
        RAISE EXCEPTION 'an organisation keeps at least one owner'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_members_owner_check';
    END IF;
    IF t.owner_user_id = OLD.user_id THEN
        UPDATE tollhouse.tenants SET owner_user_id = (
            SELECT m.user_id FROM tollhouse.tenant_members m
            WHERE m.tenant_id = OLD.tenant_id AND m.role = 'owner'
            ORDER BY m.created_at, m.user_id LIMIT 1)
        WHERE id = OLD.tenant_id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tenant_members_owner_check AFTER UPDATE OF role OR DELETE
    ON tollhouse.tenant_members
    FOR EACH ROW WHEN (OLD.role = 'owner') EXECUTE FUNCTION tollhouse.tenant_members_owner_check();

-- The acting end user's role in a tenant, for policies on the membership tables themselves
-- (a policy querying its own table would recurse). Runs as the migrating owner.
CREATE FUNCTION tollhouse.acting_member_role(p_tenant uuid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.role FROM tollhouse.tenant_members m
    WHERE m.tenant_id = p_tenant AND m.user_id = tollhouse.current_user_id()
$$;
REVOKE ALL ON FUNCTION tollhouse.acting_member_role(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.acting_member_role(uuid) TO tollhouse_user;
-- Under FORCE ROW LEVEL SECURITY a non-superuser owner needs policies for the SECURITY
-- DEFINER functions above to see and keep the rows they guard (a superuser bypasses RLS).
DO $$
BEGIN
    EXECUTE format('CREATE POLICY tenant_members_owner_read ON tollhouse.tenant_members '
                   'FOR SELECT TO %I USING (true)', current_user);
    EXECUTE format('CREATE POLICY tenants_owner_all ON tollhouse.tenants '
                   'TO %I USING (true) WITH CHECK (true)', current_user);
    EXECUTE format('CREATE POLICY users_owner_read ON tollhouse.users '
                   'FOR SELECT TO %I USING (true)', current_user);
END
$$;

-- May p_user spend p_amount from the tenant it named? Locks the member's limit row (a
-- removal then waits for the debit; a debit after a removal finds no row), moves its usage
-- to the pool's current period, and checks the limit against usage plus pending holds.
-- Returns the code of a refusal, or NULL. The caller counts the usage once the debit applies.
CREATE FUNCTION tollhouse.credit_member_gate_v1(
    p_tenant uuid, p_user uuid, p_period timestamptz, p_amount bigint, p_check_limit boolean
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m tollhouse.tenant_member_credit_limits;
    v_held bigint;
BEGIN
    IF p_user IS NULL THEN
        RETURN NULL;  -- the service spending from the pool itself
    END IF;
    SELECT * INTO m FROM tollhouse.tenant_member_credit_limits
    WHERE tenant_id = p_tenant AND user_id = p_user
    FOR UPDATE;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM tollhouse.tenants t
                   WHERE t.id = p_tenant AND t.is_default AND t.owner_user_id = p_user) THEN
            RETURN NULL;
        END IF;
        RETURN 'not_a_member';
    END IF;
    IF EXISTS (SELECT 1 FROM tollhouse.users u WHERE u.id = p_user AND u.deleted_at IS NOT NULL) THEN
        RETURN 'not_a_member';  -- a deleted user keeps its rows but spends nothing
    END IF;
    IF m.period_start IS DISTINCT FROM p_period THEN
        UPDATE tollhouse.tenant_member_credit_limits
        SET used_credits = 0, period_start = p_period, updated_at = now()
        WHERE tenant_id = p_tenant AND user_id = p_user;
        m.used_credits := 0;
    END IF;
    IF NOT p_check_limit OR m.credit_limit < 0 THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(sum(r.amount), 0) INTO v_held FROM tollhouse.credit_reservations r
    WHERE r.tenant_id = p_tenant AND r.acting_user_id = p_user AND r.status = 'pending';
    IF m.used_credits + v_held + p_amount > m.credit_limit THEN
        RETURN 'member_limit_exceeded';
    END IF;
    RETURN NULL;
END
$$;

-- True when the tenant exists but is soft-deleted: nothing is spent from it.
CREATE FUNCTION tollhouse.credit_tenant_gone_v1(p_tenant uuid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM tollhouse.tenants t
                   WHERE t.id = p_tenant AND t.deleted_at IS NOT NULL)
$$;

-- A removed member's pending holds on the pool are released (voided): nothing it reserved
-- is charged after it left. Locks the account first, as debits do.
CREATE FUNCTION tollhouse.credit_void_member_holds_v1(p_tenant uuid, p_user uuid)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_released bigint;
BEGIN
    PERFORM 1 FROM tollhouse.credit_accounts WHERE tenant_id = p_tenant FOR UPDATE;
    WITH gone AS (
        UPDATE tollhouse.credit_reservations r
        SET status = 'released', resolved_at = now()
        WHERE r.tenant_id = p_tenant AND r.acting_user_id = p_user AND r.status = 'pending'
        RETURNING r.amount, r.day
    ), totals AS (
        SELECT coalesce(sum(amount), 0) AS held,
               coalesce(sum(amount) FILTER (
                   WHERE day = (SELECT day_start FROM tollhouse.credit_accounts
                                WHERE tenant_id = p_tenant)), 0) AS today
        FROM gone
    ), upd AS (
        UPDATE tollhouse.credit_accounts c
        SET reserved = c.reserved - totals.held,
            daily_used = greatest(0, c.daily_used - totals.today), updated_at = now()
        FROM totals
        WHERE c.tenant_id = p_tenant AND totals.held > 0
    )
    SELECT held INTO v_released FROM totals;
    RETURN v_released;
END
$$;

CREATE OR REPLACE FUNCTION tollhouse.credit_debit_v1(
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
    -- Nothing new is spent from a soft-deleted tenant (a replay above still answers).
    IF p_tenant IS NOT NULL AND NOT p_reserved AND tollhouse.credit_tenant_gone_v1(p_tenant) THEN
        RETURN ROW(v_tenant, 'rejected', 'not_found', NULL, p_amount, NULL, false)::tollhouse.credit_debit_result;
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
    -- A member spending from a tenant it named: membership and its limit (a committed hold
    -- was checked when it was made, so only its usage is counted).
    IF p_tenant IS NOT NULL THEN
        v_code := tollhouse.credit_member_gate_v1(v_tenant, p_user, a.period_start, p_amount,
                                                  NOT p_reserved);
    END IF;
    IF v_code IS NOT NULL THEN
        NULL;
    ELSIF a.daily_cap IS NOT NULL AND a.daily_used + p_amount > a.daily_cap AND NOT p_reserved THEN
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
    IF p_tenant IS NOT NULL AND p_user IS NOT NULL THEN
        UPDATE tollhouse.tenant_member_credit_limits
        SET used_credits = used_credits + p_amount, updated_at = now()
        WHERE tenant_id = v_tenant AND user_id = p_user;
    END IF;
    INSERT INTO tollhouse.credit_debits
        (tenant_id, turn_id, amount, status, ledger_id, balance_after)
    VALUES (v_tenant, p_turn_id, p_amount, 'applied', v_ledger, a.balance);
    RETURN ROW(v_tenant, 'applied', NULL, v_ledger, p_amount, a.balance,
               false)::tollhouse.credit_debit_result;
END
$$;

-- Many debits in one transaction (group commit), decided set-wise: each account is locked
-- once, in tenant order (so batchers and single debits never deadlock), and refreshed only
-- when something is due; turn ids are claimed, prior outcomes read, and live grants locked
-- with one statement each for the whole batch; the debits are then decided one by one in
-- array order per tenant, exactly as credit_debit_v1 would decide them, in variables; and
-- each table is written once. (Updating one row many times in one transaction makes
-- PostgreSQL walk ever longer version chains.)
CREATE OR REPLACE FUNCTION tollhouse.credit_debit_batch_v1(
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
    -- members spending from a tenant they named: their limit rows, locked
    m record;
    m_keys text[] := '{}';
    m_tenants uuid[] := '{}';
    m_users uuid[] := '{}';
    m_limit bigint[] := '{}';
    m_used bigint[] := '{}';
    m_held bigint[] := '{}';
    m_period timestamptz[] := '{}';
    v_m integer;
    v_personal_owner uuid;
    v_gone uuid[] := '{}';
    v_members boolean := false;
    v_is_gone boolean;
    t_owners uuid[] := '{}';
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
            -- One read of the tenant: nothing new is spent from a soft-deleted one (its
            -- replays still answer), and a personal one's owner needs no limit row.
            SELECT t.deleted_at IS NOT NULL, CASE WHEN t.is_default THEN t.owner_user_id END
            INTO v_is_gone, v_personal_owner
            FROM tollhouse.tenants t WHERE t.id = v_tenant;
            v_known := v_known || v_tenant;
            t_owners := t_owners || v_personal_owner;
            IF v_is_gone THEN
                v_gone := v_gone || v_tenant;
            END IF;
        END IF;
    END LOOP;
    -- 1b. The limit rows of members spending from a tenant they named, locked after the
    --     accounts in (tenant, user) order, with the usage of the pool's current period and
    --     the member's pending holds.
    FOR i IN 1 .. n LOOP
        IF p_tenants[i] IS NOT NULL AND p_users[i] IS NOT NULL THEN
            v_members := true;
            EXIT;
        END IF;
    END LOOP;
    IF v_members THEN
        FOR m IN
            SELECT l.tenant_id, l.user_id, l.credit_limit, c.period_start,
                   CASE WHEN l.period_start IS DISTINCT FROM c.period_start THEN 0
                        ELSE l.used_credits END AS used
            FROM tollhouse.tenant_member_credit_limits l
            JOIN tollhouse.credit_accounts c ON c.tenant_id = l.tenant_id
            JOIN tollhouse.users u ON u.id = l.user_id AND u.deleted_at IS NULL
            WHERE (l.tenant_id, l.user_id) IN (
                SELECT p_tenants[x], p_users[x] FROM generate_series(1, n) AS x
                WHERE p_tenants[x] = ANY(v_known) AND p_users[x] IS NOT NULL)
            ORDER BY l.tenant_id, l.user_id
            FOR UPDATE OF l
        LOOP
            m_keys := m_keys || (m.tenant_id::text || m.user_id::text);
            m_tenants := m_tenants || m.tenant_id; m_users := m_users || m.user_id;
            m_limit := m_limit || m.credit_limit; m_used := m_used || m.used;
            m_period := m_period || m.period_start;
            m_held := m_held || CASE WHEN m.credit_limit < 0 THEN 0::bigint ELSE (
                SELECT coalesce(sum(r.amount), 0) FROM tollhouse.credit_reservations r
                WHERE r.tenant_id = m.tenant_id AND r.acting_user_id = m.user_id
                  AND r.status = 'pending') END;
        END LOOP;
    END IF;
    -- 2. Turn ids claimed in array order (sorted by turn id, then position, for a global key
    --    order): of two tenants sending one new turn id, the earlier debit gets it, as one at
    --    a time.
    claim_ok := array_fill(false, ARRAY[greatest(n, 1)]);
    FOR i IN
        SELECT x.i FROM generate_series(1, n) AS x(i)
        WHERE v_tenants[x.i] = ANY(v_known) AND v_tenants[x.i] <> ALL(v_gone)
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
        v_personal_owner := t_owners[array_position(v_known, v_tenant)];
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
            IF v_tenant = ANY(v_gone) THEN
                results[i] := ROW(v_tenant, 'rejected', 'not_found', NULL, p_amounts[i], NULL,
                                  false);
                CONTINUE;
            END IF;
            IF NOT claim_ok[i] THEN
                results[i] := ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL,
                                  p_amounts[i], NULL, false);
                CONTINUE;
            END IF;

            v_code := NULL;
            v_m := NULL;
            IF p_tenants[i] IS NOT NULL AND p_users[i] IS NOT NULL THEN
                v_m := array_position(m_keys, p_tenants[i]::text || p_users[i]::text);
                IF v_m IS NULL THEN
                    IF p_users[i] IS DISTINCT FROM v_personal_owner THEN
                        v_code := 'not_a_member';
                    END IF;
                ELSIF m_limit[v_m] >= 0
                      AND m_used[v_m] + m_held[v_m] + p_amounts[i] > m_limit[v_m] THEN
                    v_code := 'member_limit_exceeded';
                END IF;
            END IF;
            IF v_code IS NOT NULL THEN
                NULL;
            ELSIF a.daily_cap IS NOT NULL AND a.daily_used + p_amounts[i] > a.daily_cap THEN
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
            IF v_m IS NOT NULL THEN
                m_used[v_m] := m_used[v_m] + p_amounts[i];
            END IF;
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
    UPDATE tollhouse.tenant_member_credit_limits l
    SET used_credits = u.used, period_start = u.period, updated_at = now()
    FROM unnest(m_tenants, m_users, m_used, m_period) AS u(tenant_id, user_id, used, period)
    WHERE l.tenant_id = u.tenant_id AND l.user_id = u.user_id
      AND (l.used_credits <> u.used OR l.period_start IS DISTINCT FROM u.period);
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

CREATE OR REPLACE FUNCTION tollhouse.credit_reserve_v1(
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
    IF a.tenant_id IS NULL
       OR (p_tenant IS NOT NULL AND tollhouse.credit_tenant_gone_v1(p_tenant)) THEN
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
    IF p_tenant IS NOT NULL THEN
        v_code := tollhouse.credit_member_gate_v1(v_tenant, p_user, a.period_start, p_amount,
                                                  true);
    END IF;
    IF v_code IS NOT NULL THEN
        NULL;
    ELSIF a.daily_cap IS NOT NULL AND a.daily_used + p_amount > a.daily_cap THEN
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

CREATE OR REPLACE FUNCTION tollhouse.credit_resolve_v1(
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
    v_code text;
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
    -- The tenant must not be deleted and the holder must still be a member; otherwise the
    -- commit is refused and the hold stays pending (it expires, or is released).
    IF p_commit_amount IS NOT NULL THEN
        IF tollhouse.credit_tenant_gone_v1(v_tenant) THEN
            RETURN ROW(v_tenant, 'rejected', 'not_found', NULL, p_commit_amount, NULL, false)::tollhouse.credit_debit_result;
        END IF;
        v_code := tollhouse.credit_member_gate_v1(v_tenant, r.acting_user_id, a.period_start,
                                                  p_commit_amount, false);
        IF v_code IS NOT NULL THEN
            RETURN ROW(v_tenant, 'rejected', v_code, NULL, p_commit_amount, NULL, false)::tollhouse.credit_debit_result;
        END IF;
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
    -- The turn is the holder's (the service's when nobody held it): the holder's member
    -- limit counts the usage and the ledger names the holder.
    RETURN tollhouse.credit_debit_v1(v_tenant, r.acting_user_id,
                                     p_commit_amount, p_turn_id, r.session_id,
                                     p_reason, p_metadata, true, true);
END
$$;

-- Row-level security: the service manages all; members read their organisations' rows;
-- owners and admins manage members, limits and invitations (and only owners touch owners).
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenant_member_credit_limits', 'tenant_invitations',
                             'invitation_routes'] LOOP
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

CREATE POLICY tenant_members_member_read ON tollhouse.tenant_members FOR SELECT
    TO tollhouse_user USING (tollhouse.acting_member_role(tenant_id) IS NOT NULL);
CREATE POLICY tenant_members_manage ON tollhouse.tenant_members FOR UPDATE TO tollhouse_user
    USING (tollhouse.acting_member_role(tenant_id) = 'owner'
           OR (tollhouse.acting_member_role(tenant_id) = 'admin' AND role <> 'owner'))
    WITH CHECK (tollhouse.acting_member_role(tenant_id) = 'owner'
                OR (tollhouse.acting_member_role(tenant_id) = 'admin' AND role <> 'owner'));
CREATE POLICY tenant_members_remove ON tollhouse.tenant_members FOR DELETE TO tollhouse_user
    USING (tollhouse.acting_member_role(tenant_id) = 'owner'
           OR (tollhouse.acting_member_role(tenant_id) = 'admin' AND role <> 'owner')
           OR user_id = (SELECT tollhouse.current_user_id()));
GRANT UPDATE (role, updated_at), DELETE ON tollhouse.tenant_members TO tollhouse_user;

CREATE POLICY tenants_manage ON tollhouse.tenants FOR UPDATE TO tollhouse_user
    USING (NOT is_default AND tollhouse.acting_member_role(id) IN ('owner', 'admin'))
    WITH CHECK (NOT is_default AND tollhouse.acting_member_role(id) IN ('owner', 'admin'));
GRANT UPDATE (name, slug, logo_url, updated_at) ON tollhouse.tenants TO tollhouse_user;

CREATE POLICY tenant_member_credit_limits_read ON tollhouse.tenant_member_credit_limits
    FOR SELECT TO tollhouse_user
    USING (user_id = (SELECT tollhouse.current_user_id())
           OR tollhouse.acting_member_role(tenant_id) IN ('owner', 'admin'));
-- Owners set anyone's limit; admins set the limits of the others who are not owners.
CREATE POLICY tenant_member_credit_limits_manage ON tollhouse.tenant_member_credit_limits
    FOR UPDATE TO tollhouse_user
    USING (tollhouse.acting_member_role(tenant_id) = 'owner'
           OR (tollhouse.acting_member_role(tenant_id) = 'admin'
               AND user_id <> (SELECT tollhouse.current_user_id())
               AND NOT EXISTS (SELECT 1 FROM tollhouse.tenant_members m
                               WHERE m.tenant_id = tenant_member_credit_limits.tenant_id
                                 AND m.user_id = tenant_member_credit_limits.user_id
                                 AND m.role = 'owner')))
    WITH CHECK (tollhouse.acting_member_role(tenant_id) IN ('owner', 'admin'));
GRANT SELECT ON tollhouse.tenant_member_credit_limits TO tollhouse_user;
GRANT UPDATE (credit_limit, updated_at) ON tollhouse.tenant_member_credit_limits
    TO tollhouse_user;

CREATE POLICY tenant_invitations_manage_read ON tollhouse.tenant_invitations FOR SELECT
    TO tollhouse_user USING (tollhouse.acting_member_role(tenant_id) IN ('owner', 'admin'));
-- Managers may only revoke a pending invitation: no reviving a used or revoked one.
CREATE POLICY tenant_invitations_manage ON tollhouse.tenant_invitations FOR UPDATE
    TO tollhouse_user
    USING (tollhouse.acting_member_role(tenant_id) IN ('owner', 'admin') AND status = 'pending')
    WITH CHECK (tollhouse.acting_member_role(tenant_id) IN ('owner', 'admin')
                AND status = 'revoked');
GRANT SELECT (tenant_id, id, email, role, credit_limit, invited_by, status, expires_at,
              created_at, updated_at, accepted_at, accepted_by)
    ON tollhouse.tenant_invitations TO tollhouse_user;
GRANT UPDATE (status, updated_at) ON tollhouse.tenant_invitations TO tollhouse_user;

DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'tollhouse.credit_member_gate_v1(uuid, uuid, timestamptz, bigint, boolean)',
        'tollhouse.credit_tenant_gone_v1(uuid)',
        'tollhouse.credit_void_member_holds_v1(uuid, uuid)',
        'tollhouse.tenant_members_personal_check()',
        'tollhouse.tenant_members_limit_row()',
        'tollhouse.tenant_members_owner_check()'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tollhouse_service', f);
    END LOOP;
END
$$;
