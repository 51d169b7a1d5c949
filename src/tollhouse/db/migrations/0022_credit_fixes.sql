-- Fixes to the credits functions after a review. Each function is restated whole; what
-- changed is said above it.

-- A new period is the one holding now(). age() counts whole months by calendar day, but a
-- period ends at created_at + k months clamped to a short month's last day (Jan 31 ->
-- Feb 28): between that end and the next midnight age() still counted k - 1 months, so the
-- ended period was written back, its allowance already expired and no new one granted
-- until midnight. The estimate is now moved to the month whose period holds now().
CREATE OR REPLACE FUNCTION tollhouse.credit_account_v1(p_tenant uuid)
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
        WHILE a.created_at + make_interval(months => v_months + 1) <= now() LOOP
            v_months := v_months + 1;  -- a period that ended on a clamped month end
        END LOOP;
        WHILE v_months > 0 AND a.created_at + make_interval(months => v_months) > now() LOOP
            v_months := v_months - 1;  -- never a period that has not begun
        END LOOP;
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


-- A soft-deleted user spends nothing from any pool: the owner of a personal tenant naming it
-- with its user_id passed before the deleted_at check was reached. The check comes first now.
-- May p_user spend p_amount from the tenant it named? Locks the member's limit row (a
-- removal then waits for the debit; a debit after a removal finds no row), moves its usage
-- to the pool's current period, and checks the limit against usage plus pending holds.
-- Returns the code of a refusal, or NULL. The caller counts the usage once the debit applies.
CREATE OR REPLACE FUNCTION tollhouse.credit_member_gate_v1(
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
    IF EXISTS (SELECT 1 FROM tollhouse.users u WHERE u.id = p_user AND u.deleted_at IS NOT NULL) THEN
        RETURN 'not_a_member';  -- a deleted user keeps its rows but spends nothing
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


-- The same rule in a batch: a personal tenant's owner needs no limit row, unless it is
-- soft-deleted (looked up only on that path, a personal tenant named with its user_id).
CREATE OR REPLACE FUNCTION tollhouse.credit_debit_batch_v1(
    p_tenants uuid[], p_users uuid[], p_amounts bigint[], p_turn_ids text[],
    p_session_ids text[], p_reasons text[], p_metadata jsonb[]
) RETURNS SETOF tollhouse.credit_debit_result
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- Each statement here is an indexed lookup or a write of the batch's rows, whatever the
-- batch holds: a generic plan fits them all, and re-planning them for every call (what
-- PostgreSQL chooses for array parameters) was a third of a small batch's time.
SET plan_cache_mode = force_generic_plan
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
    -- the rows to write, one array element per row (one assignment each)
    l_rows tollhouse.credit_debit_ledger_row[] := '{}';
    s_rows tollhouse.credit_debit_split_row[] := '{}';
    d_rows tollhouse.credit_debit_outcome_row[] := '{}';
    -- the turn ids of d_rows, to find a turn repeated in the batch (kept unless v_plain)
    d_turns text[] := '{}';
    -- the accounts and grants to write back
    a_ids uuid[] := '{}';
    a_balance bigint[] := '{}';
    a_daily bigint[] := '{}';
    a_day date[] := '{}';
    w_tenants uuid[] := '{}';
    w_ids uuid[] := '{}';
    w_rem bigint[] := '{}';
    v_first integer;
    v_known uuid[] := '{}';
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
    t_ids uuid[] := '{}';
    t_owners uuid[] := '{}';
    v_distinct uuid[];
    v_accts tollhouse.credit_accounts[] := '{}';
    v_order integer[];
    v_pos integer := 1;
    c_turns text[] := '{}';
    c_tenants uuid[] := '{}';
    v_claimed boolean;
    v_base bytea;
    v_seq integer;
    v_all_known boolean;
    -- the live grants of the batch's tenants, in (tenant, consumption) order
    gg_tenants uuid[];
    gg_ids uuid[];
    gg_rem bigint[];
    v_stale uuid[];
    v_g integer := 1;
    v_g_end integer;
    v_gcur integer;
    v_repeats boolean;
    v_eligible integer;
    v_plain boolean := false;
    v_is_gone boolean;
    v_fresh boolean;
BEGIN
    results := array_fill(NULL::tollhouse.credit_debit_result, ARRAY[greatest(n, 1)]);
    FOR i IN 1 .. n LOOP
        IF v_tenants[i] IS NULL THEN
            v_tenants[i] := tollhouse.credit_personal_tenant_v1(p_users[i]);
        END IF;
    END LOOP;

    -- 1. Every account locked in tenant order, before anything else is written: two batches,
    --    or a batch and a single debit, cannot wait on each other. When every account
    --    exists (the usual case) one statement locks them all, and an account is brought up
    --    to date (credit_account_v1) as it is locked only when its columns say something is
    --    due: a period ended, the allowance not granted, a hold that may have expired (the
    --    member limits of step 1b count holds and usage of the current period); a grant
    --    that expired is found, and expired, in step 3. Otherwise each is opened (created if
    --    need be) and refreshed in turn, in the same order.
    --    One statement gives the batch's tenants, whether each has an account, and the
    --    debits' positions grouped by tenant (in arrival order within each).
    SELECT coalesce(array_agg(d.t ORDER BY d.t), '{}'),
           coalesce(bool_and(EXISTS (SELECT 1 FROM tollhouse.credit_accounts c
                                     WHERE c.tenant_id = d.t)), true),
           (SELECT coalesce(array_agg(x.i ORDER BY v_tenants[x.i], x.i), '{}')
            FROM generate_series(1, n) AS x(i) WHERE v_tenants[x.i] IS NOT NULL),
           (SELECT count(DISTINCT x) < n FROM unnest(p_turn_ids[1:n]) AS x)
    INTO v_distinct, v_all_known, v_order, v_repeats
    FROM (SELECT DISTINCT x AS t FROM unnest(v_tenants[1:n]) AS x WHERE x IS NOT NULL) d;
    IF v_all_known THEN
        FOR a IN
            SELECT * FROM tollhouse.credit_accounts c WHERE c.tenant_id = ANY(v_distinct)
            ORDER BY c.tenant_id FOR UPDATE
        LOOP
            IF now() >= a.period_end OR a.allowance_for IS DISTINCT FROM a.period_start
               OR a.reserved > 0 THEN
                a := tollhouse.credit_account_v1(a.tenant_id);
            END IF;
            v_known := v_known || a.tenant_id;
            v_accts := v_accts || a;
        END LOOP;
    ELSE
        FOREACH v_tenant IN ARRAY v_distinct LOOP
            a := tollhouse.credit_account_v1(v_tenant);
            IF a.tenant_id IS NOT NULL THEN
                v_known := v_known || v_tenant;
                v_accts := v_accts || a;
            END IF;
        END LOOP;
    END IF;
    -- One read of the tenants: nothing new is spent from a soft-deleted one (its replays
    -- still answer), and a personal one's owner needs no limit row.
    SELECT coalesce(array_agg(t.id ORDER BY t.id) FILTER (WHERE t.deleted_at IS NOT NULL), '{}'),
           coalesce(array_agg(t.id ORDER BY t.id), '{}'),
           coalesce(array_agg(CASE WHEN t.is_default THEN t.owner_user_id END ORDER BY t.id), '{}')
    INTO v_gone, t_ids, t_owners
    FROM tollhouse.tenants t WHERE t.id = ANY(v_known);
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
                SELECT x.t, x.u FROM unnest(p_tenants[1:n], p_users[1:n]) AS x(t, u)
                WHERE x.t = ANY(v_known) AND x.u IS NOT NULL)
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
    -- 2. Turn ids claimed with one insert in (turn id, position) order, so that of two
    --    tenants sending one new turn id the earlier debit gets it, as one at a time, and
    --    concurrent batches wait on each other's turn ids in one global order. A turn id
    --    claimed here was never seen before: its debit has no prior outcome and no hold.
    --    The others (retries, conflicts) are checked one by one in step 3; every row they
    --    conflicted with is committed by then, so that waits for nobody.
    --    When no turn id repeats in the batch and every one was claimed (the usual case),
    --    each debit of a live tenant is known to be new without looking it up.
    WITH asked AS (
        SELECT p_turn_ids[x.i] AS turn_id, v_tenants[x.i] AS tenant_id, x.i
        FROM generate_series(1, n) AS x(i)
        WHERE v_tenants[x.i] = ANY(v_known) AND v_tenants[x.i] <> ALL(v_gone)
    ), claimed AS (
        INSERT INTO tollhouse.credit_turns (turn_id, tenant_id)
        SELECT q.turn_id, q.tenant_id FROM asked q ORDER BY q.turn_id, q.i
        ON CONFLICT (turn_id) DO NOTHING
        RETURNING turn_id, tenant_id
    )
    SELECT coalesce(array_agg(turn_id), '{}'), coalesce(array_agg(tenant_id), '{}'),
           (SELECT count(*) FROM asked)
    INTO c_turns, c_tenants, v_eligible FROM claimed;
    v_plain := NOT v_repeats AND cardinality(c_turns) = v_eligible;
    -- 2b. The live grants of every tenant of the batch, locked, with one statement; the
    --     tenants that have an expired one among them, to refresh in step 3.
    SELECT array_agg(g.tenant_id ORDER BY g.tenant_id, g.priority DESC,
                     g.expires_at ASC NULLS LAST, g.created_at, g.id),
           array_agg(g.id ORDER BY g.tenant_id, g.priority DESC, g.expires_at ASC NULLS LAST,
                     g.created_at, g.id),
           array_agg(g.remaining ORDER BY g.tenant_id, g.priority DESC,
                     g.expires_at ASC NULLS LAST, g.created_at, g.id),
           array_agg(DISTINCT g.tenant_id) FILTER (WHERE g.expired)
    INTO gg_tenants, gg_ids, gg_rem, v_stale
    FROM (SELECT g.tenant_id, g.id, g.remaining, g.priority, g.expires_at, g.created_at,
                 coalesce(g.expires_at <= now(), false) AS expired
          FROM tollhouse.credit_grants g
          WHERE g.tenant_id = ANY(v_known) AND g.remaining > 0
          FOR UPDATE) g;
    gg_tenants := coalesce(gg_tenants, '{}');
    v_stale := coalesce(v_stale, '{}');
    -- 3. Decided per tenant, in array order.
    FOR k IN 1 .. coalesce(array_length(v_known, 1), 0) LOOP
        v_tenant := v_known[k];
        a := v_accts[k];
        -- The tenant's live grants, from the read above: its rows are next in it. If one has
        -- expired, the account is brought up to date (credit_account_v1 expires it) and
        -- they are read again.
        WHILE v_g <= cardinality(gg_tenants) AND gg_tenants[v_g] < v_tenant LOOP
            v_g := v_g + 1;
        END LOOP;
        v_g_end := v_g;
        WHILE v_g_end <= cardinality(gg_tenants) AND gg_tenants[v_g_end] = v_tenant LOOP
            v_g_end := v_g_end + 1;
        END LOOP;
        g_ids := gg_ids[v_g:v_g_end - 1];
        g_rem := gg_rem[v_g:v_g_end - 1];
        v_g := v_g_end;
        IF v_tenant = ANY(v_stale) THEN
            a := tollhouse.credit_account_v1(v_tenant);
            SELECT array_agg(g.id ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST,
                             g.created_at, g.id),
                   array_agg(g.remaining ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST,
                             g.created_at, g.id)
            INTO g_ids, g_rem
            FROM tollhouse.credit_grants g
            WHERE g.tenant_id = v_tenant AND g.remaining > 0
              AND NOT coalesce(g.expires_at <= now(), false);
        END IF;
        g_orig := g_rem;
        -- The tenant's ledger ids: one UUIDv7, made after any refresh above wrote its own
        -- ledger rows (so the listing keeps their order), its last two bytes counting the
        -- tenant's debits: unique and time-ordered, 46 random bits apart from any other
        -- batch's. A UUIDv7 made for each debit cost a third of deciding it.
        v_base := uuid_send(tollhouse.uuid7());
        v_seq := 0;
        v_first := cardinality(d_turns) + 1;  -- this tenant's outcomes
        v_is_gone := v_tenant = ANY(v_gone);
        v_fresh := v_plain AND NOT v_is_gone;
        v_gcur := 1;  -- the first grant with something left (each read has remaining > 0)
        v_personal_owner := t_owners[array_position(t_ids, v_tenant)];
        v_day := (now() AT TIME ZONE a.time_zone)::date;
        IF a.day_start IS NULL OR v_day > a.day_start THEN
            a.daily_used := 0;
            a.day_start := v_day;
        END IF;

        WHILE v_pos <= cardinality(v_order) AND v_tenants[v_order[v_pos]] < v_tenant LOOP
            v_pos := v_pos + 1;  -- a tenant without an account: its debits are not_found
        END LOOP;
        WHILE v_pos <= cardinality(v_order) AND v_tenants[v_order[v_pos]] = v_tenant LOOP
            i := v_order[v_pos];
            v_pos := v_pos + 1;
            IF NOT v_fresh THEN
                -- A turn decided earlier in this batch, or before it: its first outcome again.
                j := array_position(d_turns, p_turn_ids[i], v_first);
                IF j IS NOT NULL THEN
                    IF d_rows[j].amount <> p_amounts[i] THEN
                        results[i] := ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL,
                                          p_amounts[i], NULL, false)::tollhouse.credit_debit_result;
                    ELSE
                        results[i] := ROW(v_tenant, d_rows[j].status, d_rows[j].code,
                                          d_rows[j].ledger_id, d_rows[j].amount,
                                          d_rows[j].balance_after,
                                          true)::tollhouse.credit_debit_result;
                    END IF;
                    CONTINUE;
                END IF;
                j := array_position(c_turns, p_turn_ids[i]);
                v_claimed := j IS NOT NULL AND c_tenants[j] = v_tenant;
                IF NOT v_claimed THEN
                    -- Seen before: a retry, or a turn id another tenant or a hold has.
                    SELECT * INTO prior FROM tollhouse.credit_debits d
                    WHERE d.tenant_id = v_tenant AND d.turn_id = p_turn_ids[i];
                    IF FOUND THEN
                        IF prior.amount <> p_amounts[i] THEN
                            results[i] := ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL,
                                              p_amounts[i], NULL,
                                              false)::tollhouse.credit_debit_result;
                        ELSE
                            results[i] := ROW(v_tenant, prior.status, prior.code, prior.ledger_id,
                                              prior.amount, prior.balance_after,
                                              true)::tollhouse.credit_debit_result;
                        END IF;
                        CONTINUE;
                    END IF;
                    IF v_is_gone THEN
                        results[i] := ROW(v_tenant, 'rejected', 'not_found', NULL, p_amounts[i],
                                          NULL, false)::tollhouse.credit_debit_result;
                        CONTINUE;
                    END IF;
                    IF NOT tollhouse.credit_claim_turn_v1(p_turn_ids[i], v_tenant, false) THEN
                        results[i] := ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL,
                                          p_amounts[i], NULL, false)::tollhouse.credit_debit_result;
                        CONTINUE;
                    END IF;
                END IF;
            END IF;

            v_code := NULL;
            v_m := NULL;
            IF p_tenants[i] IS NOT NULL AND p_users[i] IS NOT NULL THEN
                v_m := array_position(m_keys, p_tenants[i]::text || p_users[i]::text);
                IF v_m IS NULL THEN
                    IF p_users[i] IS DISTINCT FROM v_personal_owner
                       OR EXISTS (SELECT 1 FROM tollhouse.users u
                                  WHERE u.id = p_users[i] AND u.deleted_at IS NOT NULL) THEN
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
                IF NOT v_plain THEN
                    d_turns := d_turns || p_turn_ids[i];
                END IF;
                d_rows := d_rows || ROW(v_tenant, p_turn_ids[i], p_amounts[i], 'rejected',
                                        v_code, NULL,
                                        NULL)::tollhouse.credit_debit_outcome_row;
                results[i] := ROW(v_tenant, 'rejected', v_code, NULL, p_amounts[i], NULL,
                                  false)::tollhouse.credit_debit_result;
                CONTINUE;
            END IF;

            IF v_seq = 65535 THEN  -- the counter is full: a new UUIDv7, later than the last id
                v_base := uuid_send(tollhouse.uuid7());
                v_seq := 0;
            END IF;
            v_seq := v_seq + 1;
            v_ledger := encode(overlay(v_base PLACING substring(int4send(v_seq) FROM 3)
                                       FROM 15 FOR 2), 'hex')::uuid;
            -- Consumed from the grants in order: v_gcur is the first with something left.
            v_left := p_amounts[i];
            WHILE v_left > 0 AND v_gcur <= cardinality(g_ids) LOOP
                v_take := least(v_left, g_rem[v_gcur]);
                g_rem[v_gcur] := g_rem[v_gcur] - v_take;
                v_left := v_left - v_take;
                s_rows := s_rows || ROW(v_tenant, v_ledger, g_ids[v_gcur],
                                        v_take)::tollhouse.credit_debit_split_row;
                IF g_rem[v_gcur] = 0 THEN
                    v_gcur := v_gcur + 1;
                END IF;
            END LOOP;
            a.balance := a.balance - p_amounts[i];
            a.daily_used := a.daily_used + p_amounts[i];
            IF v_m IS NOT NULL THEN
                m_used[v_m] := m_used[v_m] + p_amounts[i];
            END IF;
            l_rows := l_rows || ROW(v_tenant, v_ledger, p_reasons[i], -p_amounts[i], a.balance,
                                    p_turn_ids[i], p_session_ids[i], p_users[i],
                                    coalesce(nullif(p_metadata[i], 'null'::jsonb), '{}'::jsonb)
                                    )::tollhouse.credit_debit_ledger_row;
            IF NOT v_plain THEN
                d_turns := d_turns || p_turn_ids[i];
            END IF;
            d_rows := d_rows || ROW(v_tenant, p_turn_ids[i], p_amounts[i], 'applied', NULL,
                                    v_ledger, a.balance)::tollhouse.credit_debit_outcome_row;
            results[i] := ROW(v_tenant, 'applied', NULL, v_ledger, p_amounts[i], a.balance,
                              false)::tollhouse.credit_debit_result;
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

    -- Each table written once for the whole batch, with one statement. (Every row it writes
    -- is locked by this transaction already, and no two parts touch the same table.)
    WITH accounts AS (
        UPDATE tollhouse.credit_accounts c
        SET balance = u.balance, daily_used = u.daily, day_start = u.day, updated_at = now()
        FROM unnest(a_ids, a_balance, a_daily, a_day) AS u(tenant_id, balance, daily, day)
        WHERE c.tenant_id = u.tenant_id
    ), members AS (
        UPDATE tollhouse.tenant_member_credit_limits l
        SET used_credits = u.used, period_start = u.period, updated_at = now()
        FROM unnest(m_tenants, m_users, m_used, m_period) AS u(tenant_id, user_id, used, period)
        WHERE l.tenant_id = u.tenant_id AND l.user_id = u.user_id
          AND (l.used_credits <> u.used OR l.period_start IS DISTINCT FROM u.period)
    ), grants AS (
        UPDATE tollhouse.credit_grants g SET remaining = u.rem
        FROM unnest(w_tenants, w_ids, w_rem) AS u(tenant_id, id, rem)
        WHERE g.tenant_id = u.tenant_id AND g.id = u.id
    ), ledger AS (
        INSERT INTO tollhouse.credit_ledger
            (tenant_id, id, kind, reason, delta, balance_after, turn_id, session_id,
             acting_user_id, metadata)
        SELECT u.tenant_id, u.id, 'debit', u.reason, u.delta, u.balance_after, u.turn_id,
               u.session_id, u.acting_user_id, u.metadata
        FROM unnest(l_rows) AS u
    ), splits AS (
        INSERT INTO tollhouse.credit_ledger_splits (tenant_id, ledger_id, grant_id, amount)
        SELECT u.tenant_id, u.ledger_id, u.grant_id, u.amount FROM unnest(s_rows) AS u
    )
    INSERT INTO tollhouse.credit_debits
        (tenant_id, turn_id, amount, status, code, ledger_id, balance_after)
    SELECT u.tenant_id, u.turn_id, u.amount, u.status, u.code, u.ledger_id, u.balance_after
    FROM unnest(d_rows) AS u;

    -- A debit left without an outcome named a payer that has no account.
    RETURN QUERY
        SELECT coalesce(r.tenant_id, v_tenants[r.ord::integer]), coalesce(r.status, 'rejected'),
               CASE WHEN r.status IS NULL THEN 'not_found' ELSE r.code END, r.ledger_id,
               coalesce(r.amount, p_amounts[r.ord::integer]), r.balance_after,
               coalesce(r.replayed, false)
        FROM unnest(results[1:n]) WITH ORDINALITY
             AS r(tenant_id, status, code, ledger_id, amount, balance_after, replayed, ord)
        ORDER BY r.ord;
END
$$;

-- An adjustment refused earlier (a negative one below the floor leaves only the refusal of
-- its turn in credit_debits) is an answer for its id too: the same id with a positive
-- amount was granted; it is an idempotency conflict now.
-- A negative adjustment's turn is `adjustment:<tenant>:<id>`: turn ids are claimed across
-- tenants (credit_turns), so `adjustment:<id>` made one tenant's id a conflict for every
-- other tenant, and a client's debit of turn `adjustment:<id>` answered a later adjustment
-- as a replay. (Clients may no longer send turn ids starting with `adjustment:`.) A refusal
-- made before this migration, under `adjustment:<id>`, still answers for its id. An id too
-- long for the turn's 200 characters (153 to 189, which worked before) is named by its
-- SHA-256 there instead: `adjustment:<tenant>:sha256:<hex>`; so is an id that starts with
-- `sha256:` (it could otherwise spell another id's hashed turn).
CREATE OR REPLACE FUNCTION tollhouse.credit_adjust_v1(
    p_tenant uuid, p_user uuid, p_delta bigint, p_adjustment_id text, p_note text
) RETURNS tollhouse.credit_debit_result
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a tollhouse.credit_accounts;
    v_tenant uuid;
    prior tollhouse.credit_adjustments;
    r tollhouse.credit_debit_result;
    v_grant uuid;
    v_turn text;
    refused tollhouse.credit_debits;
BEGIN
    a := tollhouse.credit_payer_account_v1(p_tenant, p_user);
    v_tenant := coalesce(a.tenant_id, p_tenant);
    IF a.tenant_id IS NULL THEN
        RETURN ROW(v_tenant, 'rejected', 'not_found', NULL, p_delta, NULL, false)::tollhouse.credit_debit_result;
    END IF;
    SELECT * INTO prior FROM tollhouse.credit_adjustments
    WHERE tenant_id = v_tenant AND adjustment_id = p_adjustment_id;
    IF FOUND THEN
        IF prior.amount <> p_delta THEN
            RETURN ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL, p_delta, NULL, false)::tollhouse.credit_debit_result;
        END IF;
        RETURN ROW(v_tenant, 'applied', NULL, prior.ledger_id, prior.amount, prior.balance_after,
                   true)::tollhouse.credit_debit_result;
    END IF;

    v_turn := 'adjustment:' || v_tenant || ':' || CASE
        WHEN length(p_adjustment_id) <= 152 AND p_adjustment_id NOT LIKE 'sha256:%'
            THEN p_adjustment_id
        ELSE 'sha256:' || encode(sha256(convert_to(p_adjustment_id, 'UTF8')), 'hex')
    END;
    SELECT * INTO refused FROM tollhouse.credit_debits d
    WHERE d.tenant_id = v_tenant AND d.status = 'rejected'
      AND d.turn_id IN (v_turn, 'adjustment:' || p_adjustment_id)
    ORDER BY d.created_at
    LIMIT 1;
    IF FOUND THEN
        IF p_delta <> -refused.amount THEN
            RETURN ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL, p_delta, NULL, false)::tollhouse.credit_debit_result;
        END IF;
        RETURN ROW(v_tenant, 'rejected', refused.code, NULL, p_delta, NULL,
                   true)::tollhouse.credit_debit_result;
    END IF;

    IF p_delta > 0 THEN
        v_grant := tollhouse.credit_apply_grant_v1(
            v_tenant, p_delta, 'adjustment', 'adjustment:' || p_adjustment_id, 0, NULL,
            'adjustment', p_user);
        SELECT v_tenant, 'applied', NULL, l.id, p_delta, l.balance_after, false
        INTO r FROM tollhouse.credit_ledger l
        WHERE l.tenant_id = v_tenant AND l.grant_id = v_grant AND l.kind = 'grant';
    ELSE
        -- As a debit of the turn `adjustment:<tenant>:<id>` (a refusal is sticky like any
        -- debit's), deciding past the cap and member limits (p_reserved), then not counted
        -- as usage.
        r := tollhouse.credit_debit_v1(
            v_tenant, NULL, -p_delta, v_turn, NULL, 'adjustment',
            jsonb_build_object('note', p_note, 'acting_user_id', p_user), true, true);
        IF r.status <> 'applied' OR r.replayed THEN
            RETURN ROW(r.tenant_id, r.status, r.code, r.ledger_id, p_delta, r.balance_after,
                       r.replayed)::tollhouse.credit_debit_result;
        END IF;
        UPDATE tollhouse.credit_accounts
        SET daily_used = greatest(0, daily_used + p_delta)
        WHERE tenant_id = v_tenant;
        r.amount := p_delta;
    END IF;
    INSERT INTO tollhouse.credit_adjustments
        (tenant_id, adjustment_id, amount, note, acting_user_id, ledger_id, balance_after)
    VALUES (v_tenant, p_adjustment_id, p_delta, p_note, p_user, r.ledger_id, r.balance_after);
    RETURN r;
END
$$;

-- A commit whose debit is not applied leaves nothing behind: the hold was marked committed
-- and given back before the inner debit, whose refusal was returned without an error, so
-- those writes committed and the amount was never charged. A turn answered already is
-- refused before the hold is touched, and any other refusal of the inner debit raises.
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
    -- A turn another debit has answered already (a negative adjustment's, made with a
    -- client's turn id before such ids were refused) cannot be committed: refused, and the
    -- hold stays pending.
    IF p_commit_amount IS NOT NULL
       AND EXISTS (SELECT 1 FROM tollhouse.credit_debits d
                   WHERE d.tenant_id = v_tenant AND d.turn_id = p_turn_id) THEN
        RETURN ROW(v_tenant, 'rejected', 'idempotency_conflict', NULL, p_commit_amount, NULL, false)::tollhouse.credit_debit_result;
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
    v_result := tollhouse.credit_debit_v1(v_tenant, r.acting_user_id,
                                          p_commit_amount, p_turn_id, r.session_id,
                                          p_reason, p_metadata, true, true);
    -- The checks above decide as the debit does; should they ever differ, the hold must not
    -- stay committed and given back with nothing charged: the whole call is undone.
    IF v_result.status <> 'applied' OR v_result.replayed THEN
        RAISE EXCEPTION 'the commit of turn % was not applied (%); nothing changed',
            p_turn_id, coalesce(v_result.code, v_result.status);
    END IF;
    RETURN v_result;
END
$$;

-- A member removed by deleting its membership row directly (an end user under row-level
-- security, policy tenant_members_remove) kept its pending holds on the pool: only
-- OrgService voided them. A trigger does it now, whoever deletes. BEFORE the row goes, so
-- the pool's account is locked before the member's limit row (the cascade), in the order a
-- debit takes them; and the tenant before the account, in the order OrgService takes them
-- (a member leaving under RLS while the service removed another deadlocked otherwise).
-- Debits take only KEY SHARE on the tenant, which NO KEY UPDATE lets through.
-- SECURITY DEFINER: an end user may not write the credit tables.
CREATE FUNCTION tollhouse.tenant_members_void_holds() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM tollhouse.tenants WHERE id = OLD.tenant_id FOR NO KEY UPDATE;
    PERFORM tollhouse.credit_void_member_holds_v1(OLD.tenant_id, OLD.user_id);
    RETURN OLD;
END
$$;
CREATE TRIGGER tenant_members_void_holds BEFORE DELETE ON tollhouse.tenant_members
    FOR EACH ROW EXECUTE FUNCTION tollhouse.tenant_members_void_holds();
REVOKE ALL ON FUNCTION tollhouse.tenant_members_void_holds() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.tenant_members_void_holds() TO tollhouse_service;
-- Under FORCE ROW LEVEL SECURITY a non-superuser owner needs policies for the function
-- above to see and write the rows it voids (a superuser bypasses RLS).
DO $$
BEGIN
    EXECUTE format('CREATE POLICY credit_accounts_owner_all ON tollhouse.credit_accounts '
                   'TO %I USING (true) WITH CHECK (true)', current_user);
    EXECUTE format('CREATE POLICY credit_reservations_owner_all ON tollhouse.credit_reservations '
                   'TO %I USING (true) WITH CHECK (true)', current_user);
END
$$;
