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

