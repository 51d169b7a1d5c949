-- A plan change and a paid invoice's allowance in a handful of statements: both functions
-- decide exactly as before (0004, 0006). Billing's move to the effective plan reads that plan
-- under the account's lock, and calls no plan change when there is nothing to change.
--
-- Measured on the webhook benchmark's mix (docs/billing.md, Performance), PostgreSQL spent
-- two fifths of its function time in credit_change_plan_v1 (every subscription update there
-- moves its customer to another plan) and most of the rest of a statement's cost outside
-- what the statement does: starting its executor, reading the table's CHECK constraints again
-- (PostgreSQL parses them once per statement that writes the table) and its foreign-key
-- checks. A plan change ran about fourteen statements (the account updated three times, the
-- ledger written twice, four ids made by a PL/pgSQL function); now it locks and sums the
-- period's allowance in one statement and writes everything in one more
-- (credit_move_allowance_v1, which the invoice's allowance shares).
-- These functions run with plan_cache_mode = force_generic_plan: left to choose, PostgreSQL
-- planned the writing statement again on every call (its estimates depend on the arrays), and
-- that cost more than the statements saved (600-670 against 360-420 us a plan change).

-- Moves the plan allowance of account `a` (locked by the caller) in one statement: the plan
-- grants `p_ids` (with `p_left` credits left each, `p_expired` in all) expire with reason
-- `p_reason`; a plan grant of `p_new` credits until `p_expires_at` is added (a debt is repaid
-- from it first; source id `p_source_id`, or 'plan-change:' and the grant's id); the account
-- takes plan `p` with its limits (the overdraft limit grows to cover a debt left) and the
-- period `p_period_start` .. `p_period_end`, its allowance granted for `p_allowance_for`; the
-- ledger gets the expiries, then the grant, each with the balance after it. Returns the
-- account's balance after. Used by credit_change_plan_v1 and billing_invoice_allowance_v1.
CREATE FUNCTION tollhouse.credit_move_allowance_v1(
    a tollhouse.credit_accounts, p tollhouse.plans, p_ids uuid[], p_left bigint[],
    p_expired bigint, p_new bigint, p_source_id text, p_expires_at timestamptz,
    p_reason text, p_user uuid, p_period_start timestamptz, p_period_end timestamptz,
    p_allowance_for timestamptz)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_grant uuid;
BEGIN
    IF p_new > 0 THEN
        v_grant := tollhouse.uuid7();
    END IF;
    WITH expire AS (
        UPDATE tollhouse.credit_grants cg SET remaining = 0
        WHERE cg.tenant_id = a.tenant_id AND cg.id = ANY (p_ids)
    ), granted AS (
        INSERT INTO tollhouse.credit_grants
            (tenant_id, id, source, source_id, total, remaining, priority, expires_at)
        SELECT a.tenant_id, v_grant, 'plan', coalesce(p_source_id, 'plan-change:' || v_grant),
               p_new, p_new - least(p_new, greatest(0, p_expired - a.balance)), 0, p_expires_at
        WHERE p_new > 0
    ), account AS (
        UPDATE tollhouse.credit_accounts c
        SET balance = c.balance - p_expired + p_new, plan = p.name, daily_cap = p.daily_cap,
            overdraft_limit = greatest(p.overdraft_limit, p_expired - p_new - c.balance),
            period_start = p_period_start, period_end = p_period_end,
            allowance_for = p_allowance_for, updated_at = now()
        WHERE c.tenant_id = a.tenant_id
    )
    INSERT INTO tollhouse.credit_ledger
        (tenant_id, id, kind, reason, delta, balance_after, acting_user_id, grant_id)
    SELECT a.tenant_id, tollhouse.uuid7(), r.kind, r.reason, r.delta, r.balance_after, p_user,
           r.grant_id
    FROM (SELECT 'expiry' AS kind, p_reason AS reason, -e.left_over AS delta,
                 a.balance - (sum(e.left_over) OVER (ORDER BY e.n))::bigint AS balance_after,
                 e.id AS grant_id, e.n
          FROM unnest(p_ids, p_left) WITH ORDINALITY AS e (id, left_over, n)
          UNION ALL
          SELECT 'grant', 'grant.plan', p_new, a.balance - p_expired + p_new, v_grant,
                 coalesce(cardinality(p_ids), 0) + 1
          WHERE p_new > 0
          ORDER BY n) r;
    RETURN a.balance - p_expired + p_new;
END
$$;
REVOKE ALL ON FUNCTION tollhouse.credit_move_allowance_v1(
    tollhouse.credit_accounts, tollhouse.plans, uuid[], bigint[], bigint, bigint, text,
    timestamptz, text, uuid, timestamptz, timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.credit_move_allowance_v1(
    tollhouse.credit_accounts, tollhouse.plans, uuid[], bigint[], bigint, bigint, text,
    timestamptz, text, uuid, timestamptz, timestamptz, timestamptz) TO tollhouse_service;

-- Moves an account to another plan mid-period, keeping the period's usage: what is left of
-- the old allowance expires, and the new plan grants its allowance minus what the period
-- already used of the old one (a debt is repaid from it first). Limits change at once.
CREATE OR REPLACE FUNCTION tollhouse.credit_change_plan_v1(p_tenant uuid, p_user uuid, p_plan text)
RETURNS TABLE (tenant_id uuid, plan text, balance_after bigint, changed boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_tenant uuid;
    a tollhouse.credit_accounts;
    p tollhouse.plans;
    v_used bigint;
    v_expired bigint;
    v_ids uuid[];
    v_left bigint[];
    v_balance bigint;
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
    -- The allowance of this period (from the old plan), locked. Used: what left a grant
    -- other than by expiring (a debt repaid counts as used); what is left of it expires.
    SELECT coalesce(sum(g.total - g.remaining - coalesce(x.expired, 0)), 0),
           coalesce(sum(g.remaining), 0),
           array_agg(g.id ORDER BY g.id) FILTER (WHERE g.remaining > 0),
           array_agg(g.remaining ORDER BY g.id) FILTER (WHERE g.remaining > 0)
    INTO v_used, v_expired, v_ids, v_left
    FROM (SELECT cg.id, cg.total, cg.remaining FROM tollhouse.credit_grants cg
          WHERE cg.tenant_id = v_tenant AND cg.source = 'plan'
            AND cg.expires_at = a.period_end AND cg.remaining >= 0
          FOR UPDATE) g
    LEFT JOIN LATERAL (
        SELECT -sum(l.delta) AS expired FROM tollhouse.credit_ledger l
        WHERE l.tenant_id = v_tenant AND l.grant_id = g.id AND l.kind = 'expiry') x ON true;
    -- The new plan's allowance until the period's end; the period stays.
    v_balance := tollhouse.credit_move_allowance_v1(
        a, p, v_ids, v_left, v_expired, greatest(0, p.monthly_credits - v_used), NULL,
        a.period_end, 'plan_change', p_user, a.period_start, a.period_end, a.allowance_for);
    RETURN QUERY SELECT v_tenant, p.name, v_balance, true;
END
$$;

-- Grants a paid invoice's plan allowance, once per invoice, aligned with the invoice's
-- period: the live plan allowance expires, the invoice plan's allowance is granted until
-- the period's end and the account's period becomes the invoice's. An invoice whose period
-- is over, or older than one already granted, is recorded and grants nothing.
-- Returns the credits granted (0 when nothing was due) and whether it was granted before.
CREATE OR REPLACE FUNCTION tollhouse.billing_invoice_allowance_v1(p_tenant uuid, p_invoice text)
RETURNS TABLE (credits bigint, replayed boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    a tollhouse.credit_accounts;
    i tollhouse.invoices;
    p tollhouse.plans;
    v_used bigint;
    v_expired bigint;
    v_ids uuid[];
    v_left bigint[];
    v_new bigint;
BEGIN
    a := tollhouse.credit_account_v1(p_tenant);  -- locks the account: one grant at a time
    IF a.tenant_id IS NULL THEN
        RETURN;
    END IF;
    SELECT * INTO i FROM tollhouse.invoices iv
    WHERE iv.tenant_id = p_tenant AND iv.id = p_invoice FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF i.allowance_granted_at IS NOT NULL THEN
        RETURN QUERY SELECT i.allowance_credits, true;
        RETURN;
    END IF;
    IF i.period_end IS NULL OR i.period_end <= now() OR EXISTS (
        SELECT 1 FROM tollhouse.invoices o
        WHERE o.tenant_id = p_tenant AND o.allowance_credits > 0
          AND o.period_start > i.period_start) THEN
        UPDATE tollhouse.invoices iv SET allowance_granted_at = now(), allowance_credits = 0
        WHERE iv.tenant_id = p_tenant AND iv.id = p_invoice;
        RETURN QUERY SELECT 0::bigint, false;
        RETURN;
    END IF;
    -- The invoice's plan, unless the owner's plan_override says otherwise.
    SELECT * INTO p FROM tollhouse.plans pl
    WHERE pl.name = coalesce(
        (SELECT u.plan_override FROM tollhouse.tenants t
         JOIN tollhouse.users u ON u.id = t.owner_user_id
         WHERE t.id = p_tenant AND t.is_default),
        i.plan, tollhouse.billing_effective_plan_v1(p_tenant));
    -- What the tenant already spent of plan allowances since the invoice's period began (a
    -- lazy renewal, or a plan change, may have granted and partly spent this period's
    -- allowance before the invoice was paid): the invoice grants the rest, never twice.
    SELECT coalesce(sum(s.amount), 0) INTO v_used
    FROM tollhouse.credit_ledger_splits s
    JOIN tollhouse.credit_grants cg ON cg.tenant_id = s.tenant_id AND cg.id = s.grant_id
    JOIN tollhouse.credit_ledger l ON l.tenant_id = s.tenant_id AND l.id = s.ledger_id
    WHERE s.tenant_id = p_tenant AND cg.source = 'plan' AND l.created_at >= i.period_start;
    -- The live plan allowance, locked; it expires.
    SELECT coalesce(sum(g.remaining), 0), array_agg(g.id ORDER BY g.id),
           array_agg(g.remaining ORDER BY g.id)
    INTO v_expired, v_ids, v_left
    FROM (SELECT cg.id, cg.remaining FROM tollhouse.credit_grants cg
          WHERE cg.tenant_id = p_tenant AND cg.source = 'plan' AND cg.remaining > 0
          FOR UPDATE) g;
    v_new := greatest(0, p.monthly_credits - v_used);
    PERFORM tollhouse.credit_move_allowance_v1(
        a, p, v_ids, v_left, v_expired, v_new, 'stripe:invoice:' || p_invoice, i.period_end,
        'billing_period', NULL, least(i.period_start, now()), i.period_end,
        least(i.period_start, now()));
    UPDATE tollhouse.invoices iv
    SET allowance_granted_at = now(), allowance_credits = v_new
    WHERE iv.tenant_id = p_tenant AND iv.id = p_invoice;
    RETURN QUERY SELECT v_new, false;
END
$$;

-- Moves a tenant's account to its effective plan. The account is locked first and the
-- effective plan read after the lock: a concurrent move of the same tenant is waited for and
-- what it committed is seen (0009 read the plan before the lock, so the later of two racing
-- moves could apply a plan from before the other's change). An account already on its
-- effective plan has nothing to move, and the plan change, with its account upkeep, is not
-- called.
CREATE OR REPLACE FUNCTION tollhouse.billing_sync_plan_v1(p_tenant uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_current text;
    v_plan text;
BEGIN
    SELECT c.plan INTO v_current FROM tollhouse.credit_accounts c
    WHERE c.tenant_id = p_tenant
    FOR UPDATE;
    v_plan := tollhouse.billing_effective_plan_v1(p_tenant);
    IF v_current IS DISTINCT FROM v_plan THEN
        PERFORM tollhouse.credit_change_plan_v1(p_tenant, NULL, v_plan);
    END IF;
END
$$;
