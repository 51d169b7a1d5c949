-- The plan moves that a batch of webhook deliveries calls for (a subscription that changes
-- its tenant's effective plan, a paid invoice's move back to it) are made together at the end
-- of the batch, in one set-wise move for all its tenants, instead of one move per event.
--
-- On the webhook benchmark's mix (docs/billing.md, Performance), PostgreSQL spent about half
-- of its function time in billing_sync_plan_v1, most of it outside what the statements write:
-- starting and ending an executor for each of about six statements a move (locking the
-- account, reading the effective plan, the account's upkeep, locking and summing the period's
-- plan grants, the one statement writing four tables). A batch now pays for them once.
--
-- How. billing_receive_v1, given more than one delivery, sets the transaction-local setting
-- `tollhouse.deferred_plan_syncs` to ','; while it is set, billing_sync_plan_v1 lists its
-- tenant ('<uuid>,') instead of moving it. The event's subtransaction owns that change: a
-- failing event's rollback takes its tenant off the list again. Before a delivery whose
-- customer belongs to a listed tenant is applied, billing_sync_deferred_v1 moves that tenant
-- and takes it off the list; after the batch's last delivery it moves every listed tenant
-- (billing_sync_plans_v1) and empties the list; billing_receive_v1 clears the setting before
-- it returns.
--
-- What stays the same: every tenant ends on its effective plan with the credits, limits,
-- grants and ledger entries that billing_sync_plan_v1 called per event gives, in the same
-- order for each tenant: a tenant's later event in the batch sees its earlier moves made.
-- What differs: the moves of different tenants are written in one statement after their
-- events, the accounts locked in tenant order (those without an account yet: after the
-- others, in tenant order too) where each event locked its own when it came; a failure of
-- that move fails the whole call, and group commit then sends each delivery again alone
-- (tollhouse.db.group_commit), where nothing is deferred: a call of one delivery, replays,
-- retries and the Python handlers move at once, as before.

-- Moves each of `p_tenants` (in tenant order, each once) to its effective plan: what calling
-- billing_sync_plan_v1 for each of them in tenant order does, in seven statements whatever
-- their number. The accounts are locked first, and the effective plans read after the locks
-- (a concurrent move of one of these tenants is waited for and seen). Then, for the accounts
-- not on their effective plan: their upkeep (credit_account_v1: due grants expire, a new
-- period's allowance), the period's plan grants locked with what each has used, and one
-- statement that writes what credit_change_plan_v1 writes for each (credit_move_allowance_v1
-- for one account): the left-over plan credits expire, the new plan grants its allowance less
-- what the period used (a debt repaid from it first), the account takes the plan's limits,
-- and the ledger gets the expiries, then the grant, each with the balance after it.
CREATE FUNCTION tollhouse.billing_sync_plans_v1(p_tenants uuid[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    -- Each tenant once, in tenant order.
    v_all uuid[] := ARRAY(SELECT DISTINCT x FROM unnest(p_tenants) AS x
                          WHERE x IS NOT NULL ORDER BY x);
    v_locked uuid[];
    v_tenants uuid[];
    v_plans text[];
    -- The accounts that move: tenant, balance after upkeep, period end, target plan.
    a_tenant uuid[];
    a_balance bigint[];
    a_period_end timestamptz[];
    a_plan text[];
    v_unknown text;
    -- Their period's plan grants, in (tenant, id) order: total, remaining, expired before.
    g_tenant uuid[];
    g_id uuid[];
    g_total bigint[];
    g_remaining bigint[];
    g_expired bigint[];
    -- The grants with credits left (which expire).
    x_tenant uuid[];
    x_id uuid[];
BEGIN
    SELECT array_agg(l.tenant_id) INTO v_locked
    FROM (SELECT c.tenant_id FROM tollhouse.credit_accounts c
          WHERE c.tenant_id = ANY (v_all)
          ORDER BY c.tenant_id
          FOR UPDATE) l;
    -- A tenant whose account was not locked above (it had none; one may have been made
    -- since) gets it from credit_account_v1, which makes or finds it and locks it, waiting
    -- for a concurrent making: every effective plan below is read after its account's lock.
    PERFORM tollhouse.credit_account_v1(t.tenant_id)
    FROM unnest(v_all) WITH ORDINALITY AS t (tenant_id, n)
    WHERE t.tenant_id <> ALL (coalesce(v_locked, '{}'))
    ORDER BY t.n;
    -- The tenants whose account is not on its effective plan (or who have none: a deleted
    -- tenant, left to credit_account_v1 below). Each account is read by a subquery of its own
    -- (here and below), so that no plan depends on the tables' statistics: a fresh install's
    -- tables are planned as empty. OFFSET 0: the effective plan is computed once a tenant.
    SELECT array_agg(u.tenant_id ORDER BY u.tenant_id), array_agg(u.plan ORDER BY u.tenant_id)
    INTO v_tenants, v_plans
    FROM (SELECT t.tenant_id, tollhouse.billing_effective_plan_v1(t.tenant_id) AS plan,
                 (SELECT c.plan FROM tollhouse.credit_accounts c
                  WHERE c.tenant_id = t.tenant_id) AS current
          FROM unnest(v_all) AS t (tenant_id)
          OFFSET 0) u
    WHERE u.current IS DISTINCT FROM u.plan;
    IF v_tenants IS NULL THEN
        RETURN;
    END IF;
    -- The upkeep, in tenant order; an account already on its plan after it does not move.
    SELECT array_agg(a.tenant_id ORDER BY u.n), array_agg(a.balance ORDER BY u.n),
           array_agg(a.period_end ORDER BY u.n), array_agg(u.plan ORDER BY u.n),
           min(u.plan) FILTER (WHERE NOT EXISTS (
               SELECT 1 FROM tollhouse.plans p WHERE p.name = u.plan))
    INTO a_tenant, a_balance, a_period_end, a_plan, v_unknown
    FROM unnest(v_tenants, v_plans) WITH ORDINALITY AS u (tenant_id, plan, n)
    CROSS JOIN LATERAL tollhouse.credit_account_v1(u.tenant_id) a
    WHERE a.tenant_id IS NOT NULL AND a.plan IS DISTINCT FROM u.plan;
    -- As credit_change_plan_v1 refuses a plan that does not exist.
    IF v_unknown IS NOT NULL THEN
        RAISE EXCEPTION 'no plan %', v_unknown USING ERRCODE = 'foreign_key_violation',
            CONSTRAINT = 'credit_accounts_plan_fkey';
    END IF;
    IF a_tenant IS NULL THEN
        RETURN;
    END IF;
    -- The period's allowance (from the old plan), locked, with what expired of each grant.
    SELECT array_agg(g.tenant_id ORDER BY g.tenant_id, g.id),
           array_agg(g.id ORDER BY g.tenant_id, g.id),
           array_agg(g.total ORDER BY g.tenant_id, g.id),
           array_agg(g.remaining ORDER BY g.tenant_id, g.id),
           array_agg(coalesce(x.expired, 0) ORDER BY g.tenant_id, g.id),
           array_agg(g.tenant_id) FILTER (WHERE g.remaining > 0),
           array_agg(g.id) FILTER (WHERE g.remaining > 0)
    INTO g_tenant, g_id, g_total, g_remaining, g_expired, x_tenant, x_id
    FROM unnest(a_tenant, a_period_end) AS a (tenant_id, period_end)
    CROSS JOIN LATERAL (
        SELECT cg.tenant_id, cg.id, cg.total::bigint AS total, cg.remaining
        FROM tollhouse.credit_grants cg
        WHERE cg.tenant_id = a.tenant_id AND cg.source = 'plan'
          AND cg.expires_at = a.period_end AND cg.remaining >= 0
        FOR UPDATE) g
    LEFT JOIN LATERAL (
        SELECT -sum(l.delta)::bigint AS expired FROM tollhouse.credit_ledger l
        WHERE l.tenant_id = g.tenant_id AND l.grant_id = g.id AND l.kind = 'expiry') x ON true;
    -- ANY (the grants that expire, the accounts) below makes the updates index scans even
    -- where the statistics call the table empty, as a fresh install's do (a hash join of the
    -- whole table was chosen, and cost more with every grant).
    -- Used: what left a grant other than by expiring (a debt repaid counts as used); what is
    -- left of it expires; the new plan grants its allowance less what was used.
    WITH g AS (
        SELECT * FROM unnest(g_tenant, g_id, g_total, g_remaining, g_expired) WITH ORDINALITY
            AS g (tenant_id, id, total, remaining, expired, n)
    ), m AS MATERIALIZED (
        SELECT a.tenant_id, a.balance, a.period_end, a.plan, p.daily_cap, p.overdraft_limit,
               coalesce(s.expired, 0) AS expired, c.credits,
               CASE WHEN c.credits > 0 THEN tollhouse.uuid7() END AS grant_id
        FROM unnest(a_tenant, a_balance, a_period_end, a_plan)
            AS a (tenant_id, balance, period_end, plan)
        JOIN tollhouse.plans p ON p.name = a.plan
        LEFT JOIN (SELECT g.tenant_id, sum(g.total - g.remaining - g.expired)::bigint AS used,
                          sum(g.remaining)::bigint AS expired
                   FROM g GROUP BY g.tenant_id) s ON s.tenant_id = a.tenant_id
        CROSS JOIN LATERAL (
            SELECT greatest(0, p.monthly_credits - coalesce(s.used, 0)) AS credits) c
    ), expire AS (
        UPDATE tollhouse.credit_grants cg SET remaining = 0
        FROM g
        WHERE cg.tenant_id = g.tenant_id AND cg.id = g.id AND g.remaining > 0
          AND cg.tenant_id = ANY (x_tenant) AND cg.id = ANY (x_id)
    ), granted AS (
        INSERT INTO tollhouse.credit_grants
            (tenant_id, id, source, source_id, total, remaining, priority, expires_at)
        SELECT m.tenant_id, m.grant_id, 'plan', 'plan-change:' || m.grant_id, m.credits,
               m.credits - least(m.credits, greatest(0, m.expired - m.balance)), 0, m.period_end
        FROM m WHERE m.credits > 0
    ), account AS (
        UPDATE tollhouse.credit_accounts c
        SET balance = c.balance - m.expired + m.credits, plan = m.plan, daily_cap = m.daily_cap,
            overdraft_limit = greatest(m.overdraft_limit, m.expired - m.credits - c.balance),
            updated_at = now()
        FROM m WHERE c.tenant_id = m.tenant_id AND c.tenant_id = ANY (a_tenant)
    )
    INSERT INTO tollhouse.credit_ledger
        (tenant_id, id, kind, reason, delta, balance_after, acting_user_id, grant_id)
    SELECT r.tenant_id, tollhouse.uuid7(), r.kind, r.reason, r.delta, r.balance_after, NULL,
           r.grant_id
    FROM (SELECT g.tenant_id, 'expiry' AS kind, 'plan_change' AS reason, -g.remaining AS delta,
                 m.balance - (sum(g.remaining) OVER (PARTITION BY g.tenant_id
                                                     ORDER BY g.n))::bigint AS balance_after,
                 g.id AS grant_id, g.n
          FROM g JOIN m ON m.tenant_id = g.tenant_id
          WHERE g.remaining > 0
          UNION ALL
          SELECT m.tenant_id, 'grant', 'grant.plan', m.credits, m.balance - m.expired + m.credits,
                 m.grant_id, NULL
          FROM m WHERE m.credits > 0
          ORDER BY tenant_id, n) r;
END
$$;

-- Moves the tenants listed in `tollhouse.deferred_plan_syncs` to their effective plans and
-- takes them off the list: all of them, or only `p_tenant` (a no-op when it is not listed or
-- nothing is deferred).
CREATE FUNCTION tollhouse.billing_sync_deferred_v1(p_tenant uuid DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_listed text := current_setting('tollhouse.deferred_plan_syncs', true);
BEGIN
    IF p_tenant IS NULL AND v_listed LIKE ',_%' THEN
        PERFORM tollhouse.billing_sync_plans_v1(
            string_to_array(btrim(v_listed, ','), ',')::uuid[]);
        PERFORM set_config('tollhouse.deferred_plan_syncs', ',', true);
    ELSIF strpos(v_listed, ',' || p_tenant || ',') > 0 THEN
        PERFORM tollhouse.billing_sync_plans_v1(ARRAY[p_tenant]);
        PERFORM set_config('tollhouse.deferred_plan_syncs',
                           replace(v_listed, ',' || p_tenant || ',', ','), true);
    END IF;
END
$$;

-- As in 0014, unless billing_receive_v1 defers the move: then the tenant is listed (once).
-- And a tenant without an account gets one before its effective plan is read.
CREATE OR REPLACE FUNCTION tollhouse.billing_sync_plan_v1(p_tenant uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_current text;
    v_plan text;
    v_deferred text := current_setting('tollhouse.deferred_plan_syncs', true);
BEGIN
    IF v_deferred LIKE ',%' AND p_tenant IS NOT NULL THEN
        IF strpos(v_deferred, ',' || p_tenant || ',') = 0 THEN
            PERFORM set_config('tollhouse.deferred_plan_syncs', v_deferred || p_tenant || ',',
                               true);
        END IF;
        RETURN;
    END IF;
    SELECT c.plan INTO v_current FROM tollhouse.credit_accounts c
    WHERE c.tenant_id = p_tenant
    FOR UPDATE;
    IF NOT FOUND THEN
        -- No account yet: it is made and locked first (a concurrent making of it is waited
        -- for), so that the plan below is read after the lock here too (0014 read it before:
        -- two first moves of one tenant at once could leave the account on the older plan).
        v_current := (tollhouse.credit_account_v1(p_tenant)).plan;
    END IF;
    v_plan := tollhouse.billing_effective_plan_v1(p_tenant);
    IF v_current IS DISTINCT FROM v_plan THEN
        PERFORM tollhouse.credit_change_plan_v1(p_tenant, NULL, v_plan);
    END IF;
END
$$;

-- As in 0009, deferring the plan moves of a batch of more than one delivery (above).
-- `p_customers[i]` is the customer the delivery's handler routes (Python's
-- handlers.event_customer): a listed tenant's move is made before a delivery of a customer
-- of that tenant.
CREATE OR REPLACE FUNCTION tollhouse.billing_receive_v1(
    p_events jsonb, p_hashes text[], p_customers text[], p_unpark boolean, p_source text)
RETURNS TABLE (stripe_event_id text, type text, status text, error text, tenant_id uuid,
               customer_id text, unpark boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    ev jsonb;
    v_id text;
    v_hash text;
    v_source text;
    v_created timestamptz;
    r record;
    v_unparking boolean := false;
    v_defer boolean := coalesce(array_length(p_hashes, 1), 0) > 1;
    v_routed uuid;
BEGIN
    IF v_defer THEN
        PERFORM set_config('tollhouse.deferred_plan_syncs', ',', true);
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_hashes, 1), 0) LOOP
        ev := p_events -> (i - 1);
        v_id := ev ->> 'id';
        stripe_event_id := v_id;
        type := ev ->> 'type';
        PERFORM pg_advisory_xact_lock(hashtextextended('tollhouse.stripe_event:' || v_id, 0));
        SELECT e.payload_hash, e.source INTO v_hash, v_source FROM tollhouse.billing_events e
        WHERE e.stripe_event_id = v_id;
        IF FOUND THEN
            error := NULL;
            tenant_id := NULL;
            customer_id := p_customers[i];
            unpark := false;
            -- An event read from the API has no body as Stripe signed it to compare: the id
            -- (Stripe's own, and the delivery's signature checked) decides.
            IF v_hash = p_hashes[i] OR v_source = 'api' OR p_source = 'api' THEN
                status := 'duplicate';
            ELSE
                INSERT INTO tollhouse.billing_event_conflicts AS c (stripe_event_id, payload_hash)
                VALUES (v_id, p_hashes[i])
                ON CONFLICT (stripe_event_id, payload_hash) DO UPDATE
                SET deliveries = c.deliveries + 1, last_at = now();
                status := 'conflict';
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_created := tollhouse.billing_ts_v1(ev -> 'created');
        -- A tenant's deferred move is made before another of its events is applied.
        IF v_defer AND current_setting('tollhouse.deferred_plan_syncs') <> ',' THEN
            v_routed := tollhouse.billing_route_v1(p_customers[i]);
            IF v_routed IS NOT NULL THEN
                PERFORM tollhouse.billing_sync_deferred_v1(v_routed);
            END IF;
        END IF;
        SELECT * INTO r FROM tollhouse.billing_try_apply_v1(
            type, ev #> '{data,object}', coalesce(v_created, now()), p_customers[i]);
        INSERT INTO tollhouse.billing_events AS e
            (stripe_event_id, type, tenant_id, user_id, customer_id, status, payload_hash,
             payload, event_created, attempts, last_error, processed_at, source)
        VALUES (v_id, ev ->> 'type', r.tenant_id,
                (SELECT t.owner_user_id FROM tollhouse.tenants t
                 WHERE t.id = r.tenant_id AND t.is_default),
                r.customer_id, r.status, p_hashes[i], ev, v_created, 1, r.error, now(),
                p_source);
        status := r.status;
        error := r.error;
        tenant_id := r.tenant_id;
        customer_id := r.customer_id;
        unpark := r.status = 'processed' AND r.tenant_id IS NOT NULL
                  AND tollhouse.billing_parked_waiting_v1(r.customer_id, v_id);
        v_unparking := v_unparking OR unpark;
        RETURN NEXT;
    END LOOP;
    IF v_defer THEN
        PERFORM tollhouse.billing_sync_deferred_v1();
        PERFORM set_config('tollhouse.deferred_plan_syncs', '', true);
    END IF;
    IF v_unparking AND NOT p_unpark THEN
        RAISE EXCEPTION USING ERRCODE = 'TB003', MESSAGE = 'parked events to apply';
    END IF;
END
$$;

DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'tollhouse.billing_sync_plans_v1(uuid[])',
        'tollhouse.billing_sync_deferred_v1(uuid)'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tollhouse_service', f);
    END LOOP;
END
$$;
