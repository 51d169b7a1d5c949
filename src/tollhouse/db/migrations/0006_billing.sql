-- Billing (Stripe): customers and their global routes, products and prices (reference
-- tables), subscriptions, invoices, lifetime deals, credit-pack purchases, and every webhook
-- event received. Each owned table carries its tenant first in its keys; a Stripe id that
-- must be found without its tenant (customer, event) has its own global table.
-- Order independence: every synced row keeps `stripe_at`, the Stripe time of the state it
-- holds (the event's `created`, or the time of a fetch), and an update applies only when it
-- is newer (ties: a canceled subscription wins, as Stripe never revives one).

CREATE TABLE tollhouse.billing_customers (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id),
    provider text NOT NULL DEFAULT 'stripe',
    customer_id text NOT NULL,
    email text,
    name text,
    deleted boolean NOT NULL DEFAULT false,
    stripe_at timestamptz,
    raw_data jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT billing_customers_pkey PRIMARY KEY (tenant_id, provider, customer_id),
    CONSTRAINT billing_customers_customer_id_check CHECK (char_length(customer_id) BETWEEN 1 AND 255)
);

-- Routing table: a Stripe customer belongs to one tenant, for good.
CREATE TABLE tollhouse.billing_customer_routes (
    provider text NOT NULL DEFAULT 'stripe',
    customer_id text NOT NULL,
    tenant_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT billing_customer_routes_pkey PRIMARY KEY (provider, customer_id)
);
CREATE INDEX billing_customer_routes_tenant_idx ON tollhouse.billing_customer_routes (tenant_id);

-- Products and prices: small reference tables, mapped to plans and credit packs by metadata.
CREATE TABLE tollhouse.billing_products (
    id text NOT NULL,
    name text,
    active boolean NOT NULL DEFAULT true,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    stripe_at timestamptz NOT NULL,
    raw_data jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT billing_products_pkey PRIMARY KEY (id)
);

CREATE TABLE tollhouse.billing_prices (
    id text NOT NULL,
    product_id text,
    active boolean NOT NULL DEFAULT true,
    type text,
    currency text,
    unit_amount bigint,
    recurring_interval text,
    plan text REFERENCES tollhouse.plans (name),
    credits bigint,
    lifetime boolean NOT NULL DEFAULT false,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    stripe_at timestamptz NOT NULL,
    raw_data jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT billing_prices_pkey PRIMARY KEY (id),
    CONSTRAINT billing_prices_credits_check CHECK (credits IS NULL OR credits > 0),
    CONSTRAINT billing_prices_lifetime_check CHECK (NOT lifetime OR plan IS NOT NULL)
);

CREATE TABLE tollhouse.subscriptions (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id),
    id text NOT NULL,
    provider text NOT NULL DEFAULT 'stripe',
    customer_id text NOT NULL,
    status text NOT NULL,
    plan text REFERENCES tollhouse.plans (name),
    price_id text,
    amount bigint,
    currency text,
    current_period_start timestamptz,
    current_period_end timestamptz,
    trial_end timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    canceled_at timestamptz,
    ended_at timestamptz,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    raw_data jsonb,
    stripe_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_pkey PRIMARY KEY (tenant_id, id),
    CONSTRAINT subscriptions_status_check CHECK (status IN (
        'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled',
        'unpaid', 'paused'))
);
CREATE INDEX subscriptions_current_idx ON tollhouse.subscriptions (tenant_id, current_period_end)
    WHERE status IN ('active', 'trialing', 'past_due');

CREATE TABLE tollhouse.invoices (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id),
    id text NOT NULL,
    customer_id text NOT NULL,
    subscription_id text,
    status text,
    plan text REFERENCES tollhouse.plans (name),
    amount_due bigint,
    amount_paid bigint,
    currency text,
    period_start timestamptz,
    period_end timestamptz,
    paid boolean NOT NULL DEFAULT false,
    payment_failed boolean NOT NULL DEFAULT false,
    -- When this invoice's plan allowance was granted (once per invoice), and how much.
    allowance_granted_at timestamptz,
    allowance_credits bigint,
    hosted_invoice_url text,
    raw_data jsonb,
    stripe_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT invoices_pkey PRIMARY KEY (tenant_id, id)
);

CREATE TABLE tollhouse.lifetime_purchases (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id),
    id text NOT NULL,
    price_id text NOT NULL,
    plan text NOT NULL REFERENCES tollhouse.plans (name),
    payment_intent text,
    amount bigint,
    currency text,
    refunded_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT lifetime_purchases_pkey PRIMARY KEY (tenant_id, id)
);

-- Credit packs bought through Checkout: the grant they made, and how much a refund took back.
CREATE TABLE tollhouse.credit_pack_purchases (
    tenant_id uuid NOT NULL REFERENCES tollhouse.tenants (id),
    id text NOT NULL,
    price_id text NOT NULL,
    payment_intent text,
    credits bigint NOT NULL,
    amount bigint,
    grant_id uuid,
    refunded_amount bigint NOT NULL DEFAULT 0,
    taken_back bigint NOT NULL DEFAULT 0,
    unrecovered bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_pack_purchases_pkey PRIMARY KEY (tenant_id, id),
    CONSTRAINT credit_pack_purchases_credits_check CHECK (credits > 0),
    CONSTRAINT credit_pack_purchases_taken_back_check
        CHECK (taken_back >= 0 AND unrecovered >= 0 AND taken_back + unrecovered <= credits)
);
CREATE INDEX credit_pack_purchases_payment_idx ON tollhouse.credit_pack_purchases (payment_intent);
CREATE INDEX lifetime_purchases_payment_idx ON tollhouse.lifetime_purchases (payment_intent);

-- Every webhook event received, keyed by Stripe's id (a global table: events are looked up
-- by id alone). `parked`: its customer is not linked to a tenant yet.
CREATE TABLE tollhouse.billing_events (
    stripe_event_id text NOT NULL,
    type text NOT NULL,
    tenant_id uuid,
    user_id uuid,
    customer_id text,
    status text NOT NULL DEFAULT 'received',
    payload_hash text NOT NULL,
    payload jsonb NOT NULL,
    event_created timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    received_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    CONSTRAINT billing_events_pkey PRIMARY KEY (stripe_event_id),
    CONSTRAINT billing_events_status_check
        CHECK (status IN ('received', 'processed', 'failed', 'ignored', 'parked')),
    CONSTRAINT billing_events_payload_hash_check CHECK (payload_hash ~ '^[0-9a-f]{64}$')
);
CREATE INDEX billing_events_status_idx ON tollhouse.billing_events (status, received_at);
CREATE INDEX billing_events_parked_idx ON tollhouse.billing_events (customer_id, event_created)
    WHERE status = 'parked';
CREATE INDEX billing_events_tenant_idx ON tollhouse.billing_events (tenant_id, received_at);
-- A refund that came before its purchase is found by its payment when the purchase comes.
CREATE INDEX billing_events_refunds_idx ON tollhouse.billing_events
    ((payload #>> '{data,object,payment_intent}')) WHERE type = 'charge.refunded';

-- A delivery that reused an event id with another body: recorded, never applied.
CREATE TABLE tollhouse.billing_event_conflicts (
    stripe_event_id text NOT NULL,
    payload_hash text NOT NULL,
    deliveries integer NOT NULL DEFAULT 1,
    first_at timestamptz NOT NULL DEFAULT now(),
    last_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT billing_event_conflicts_pkey PRIMARY KEY (stripe_event_id, payload_hash)
);

-- The plan billing gives a tenant: its current subscription's (active, trialing or past_due;
-- Stripe's dunning ends a past_due one as unpaid or canceled), else a lifetime deal's, else
-- NULL. The effective plan puts the owner's plan_override before it and `free` after it.
CREATE FUNCTION tollhouse.billing_plan_v1(p_tenant uuid) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
        (SELECT s.plan FROM tollhouse.subscriptions s
         WHERE s.tenant_id = p_tenant AND s.status IN ('active', 'trialing', 'past_due')
           AND s.plan IS NOT NULL
         ORDER BY s.current_period_end DESC NULLS LAST, s.stripe_at DESC, s.id
         LIMIT 1),
        (SELECT l.plan FROM tollhouse.lifetime_purchases l
         JOIN tollhouse.plans p ON p.name = l.plan
         WHERE l.tenant_id = p_tenant AND l.refunded_at IS NULL
         ORDER BY p.monthly_credits DESC, l.created_at
         LIMIT 1))
$$;

CREATE FUNCTION tollhouse.billing_effective_plan_v1(p_tenant uuid) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
        (SELECT u.plan_override FROM tollhouse.tenants t
         JOIN tollhouse.users u ON u.id = t.owner_user_id
         WHERE t.id = p_tenant AND t.is_default),
        tollhouse.billing_plan_v1(p_tenant),
        'free')
$$;

-- Grants a paid invoice's plan allowance, once per invoice, aligned with the invoice's
-- period: the live plan allowance expires, the invoice plan's allowance is granted until
-- the period's end and the account's period becomes the invoice's. An invoice whose period
-- is over, or older than one already granted, is recorded and grants nothing.
-- Returns the credits granted (0 when nothing was due) and whether it was granted before.
CREATE FUNCTION tollhouse.billing_invoice_allowance_v1(p_tenant uuid, p_invoice text)
RETURNS TABLE (credits bigint, replayed boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    a tollhouse.credit_accounts;
    i tollhouse.invoices;
    p tollhouse.plans;
    g tollhouse.credit_grants;
    v_used bigint;
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
    FOR g IN
        SELECT * FROM tollhouse.credit_grants cg
        WHERE cg.tenant_id = p_tenant AND cg.source = 'plan' AND cg.remaining > 0
        FOR UPDATE
    LOOP
        UPDATE tollhouse.credit_grants cg SET remaining = 0
        WHERE cg.tenant_id = p_tenant AND cg.id = g.id;
        UPDATE tollhouse.credit_accounts c SET balance = c.balance - g.remaining, updated_at = now()
        WHERE c.tenant_id = p_tenant
        RETURNING * INTO a;
        INSERT INTO tollhouse.credit_ledger
            (tenant_id, id, kind, reason, delta, balance_after, grant_id)
        VALUES (p_tenant, tollhouse.uuid7(), 'expiry', 'billing_period', -g.remaining, a.balance,
                g.id);
    END LOOP;
    v_new := greatest(0, p.monthly_credits - v_used);
    IF v_new > 0 THEN
        PERFORM tollhouse.credit_apply_grant_v1(
            p_tenant, v_new, 'plan', 'stripe:invoice:' || p_invoice, 0, i.period_end,
            'grant.plan', NULL);
    END IF;
    UPDATE tollhouse.credit_accounts c
    SET plan = p.name, daily_cap = p.daily_cap,
        overdraft_limit = greatest(p.overdraft_limit, -c.balance),
        period_start = least(i.period_start, now()), period_end = i.period_end,
        allowance_for = least(i.period_start, now()), updated_at = now()
    WHERE c.tenant_id = p_tenant;
    UPDATE tollhouse.invoices iv
    SET allowance_granted_at = now(), allowance_credits = v_new
    WHERE iv.tenant_id = p_tenant AND iv.id = p_invoice;
    RETURN QUERY SELECT v_new, false;
END
$$;

-- Grants a credit pack bought through Checkout, once per session.
CREATE FUNCTION tollhouse.billing_credit_pack_v1(
    p_tenant uuid, p_session text, p_price text, p_payment_intent text, p_credits bigint,
    p_amount bigint
) RETURNS TABLE (grant_id uuid, replayed boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_grant uuid;
BEGIN
    INSERT INTO tollhouse.credit_pack_purchases
        (tenant_id, id, price_id, payment_intent, credits, amount)
    VALUES (p_tenant, p_session, p_price, p_payment_intent, p_credits, p_amount)
    ON CONFLICT (tenant_id, id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT cp.grant_id, true FROM tollhouse.credit_pack_purchases cp
                     WHERE cp.tenant_id = p_tenant AND cp.id = p_session;
        RETURN;
    END IF;
    SELECT r.grant_id INTO v_grant FROM tollhouse.credit_grant_v1(
        p_tenant, NULL, p_credits, 'purchase', 'stripe:checkout:' || p_session, 10, NULL) r;
    UPDATE tollhouse.credit_pack_purchases cp SET grant_id = v_grant
    WHERE cp.tenant_id = p_tenant AND cp.id = p_session;
    RETURN QUERY SELECT v_grant, false;
END
$$;

-- A refund of a credit pack's charge takes back, in proportion to the amount refunded (the
-- charge's cumulative amount_refunded, so a repeat changes nothing), what is still unspent
-- of the pack's grant; what was already spent is recorded as unrecovered (not made a debt).
CREATE FUNCTION tollhouse.billing_refund_pack_v1(
    p_tenant uuid, p_session text, p_refunded_amount bigint
) RETURNS TABLE (taken_back bigint, unrecovered bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    a tollhouse.credit_accounts;
    cp tollhouse.credit_pack_purchases;
    g tollhouse.credit_grants;
    v_due bigint;
    v_take bigint;
BEGIN
    a := tollhouse.credit_account_v1(p_tenant);
    SELECT * INTO cp FROM tollhouse.credit_pack_purchases c
    WHERE c.tenant_id = p_tenant AND c.id = p_session FOR UPDATE;
    IF NOT FOUND OR p_refunded_amount <= cp.refunded_amount THEN
        RETURN QUERY SELECT coalesce(cp.taken_back, 0), coalesce(cp.unrecovered, 0);
        RETURN;
    END IF;
    v_due := CASE WHEN coalesce(cp.amount, 0) <= 0 OR p_refunded_amount >= cp.amount
                  THEN cp.credits
                  ELSE cp.credits * p_refunded_amount / cp.amount END
             - cp.taken_back - cp.unrecovered;
    SELECT * INTO g FROM tollhouse.credit_grants cg
    WHERE cg.tenant_id = p_tenant AND cg.id = cp.grant_id FOR UPDATE;
    v_take := least(greatest(v_due, 0), coalesce(g.remaining, 0));
    IF v_take > 0 THEN
        UPDATE tollhouse.credit_grants cg SET remaining = cg.remaining - v_take
        WHERE cg.tenant_id = p_tenant AND cg.id = g.id;
        UPDATE tollhouse.credit_accounts c SET balance = c.balance - v_take, updated_at = now()
        WHERE c.tenant_id = p_tenant
        RETURNING * INTO a;
        INSERT INTO tollhouse.credit_ledger
            (tenant_id, id, kind, reason, delta, balance_after, grant_id, metadata)
        VALUES (p_tenant, tollhouse.uuid7(), 'debit', 'charge_refunded', -v_take, a.balance,
                g.id, jsonb_build_object('checkout_session', p_session));
    END IF;
    UPDATE tollhouse.credit_pack_purchases c
    SET refunded_amount = p_refunded_amount, taken_back = c.taken_back + v_take,
        unrecovered = c.unrecovered + greatest(v_due, 0) - v_take
    WHERE c.tenant_id = p_tenant AND c.id = p_session
    RETURNING c.taken_back, c.unrecovered INTO cp.taken_back, cp.unrecovered;
    RETURN QUERY SELECT cp.taken_back, cp.unrecovered;
END
$$;

-- Row-level security and grants --------------------------------------------------------------

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'billing_customers', 'billing_customer_routes', 'billing_products', 'billing_prices',
        'subscriptions', 'invoices', 'lifetime_purchases', 'credit_pack_purchases',
        'billing_events', 'billing_event_conflicts'
    ] LOOP
        EXECUTE format('ALTER TABLE tollhouse.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE tollhouse.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY %I ON tollhouse.%I TO tollhouse_service USING (true) WITH CHECK (true)',
            t || '_service', t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON tollhouse.%I TO tollhouse_service', t);
    END LOOP;
END
$$;

-- End users read their tenants' billing rows (never write them); products and prices are
-- public to them.
CREATE POLICY billing_products_read ON tollhouse.billing_products FOR SELECT TO tollhouse_user
    USING (true);
CREATE POLICY billing_prices_read ON tollhouse.billing_prices FOR SELECT TO tollhouse_user
    USING (true);
GRANT SELECT ON tollhouse.billing_products, tollhouse.billing_prices TO tollhouse_user;
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['subscriptions', 'invoices', 'lifetime_purchases',
                             'credit_pack_purchases'] LOOP
        EXECUTE format(
            'CREATE POLICY %I ON tollhouse.%I FOR SELECT TO tollhouse_user USING ('
            'EXISTS (SELECT 1 FROM tollhouse.tenant_members m WHERE m.tenant_id = %I.tenant_id'
            ' AND m.user_id = (SELECT tollhouse.current_user_id())))',
            t || '_member_read', t, t);
        EXECUTE format('GRANT SELECT ON tollhouse.%I TO tollhouse_user', t);
    END LOOP;
    -- Customers' details and raw events hold personal data (the payer's e-mail, address):
    -- only a tenant's owners and admins read them.
    FOREACH t IN ARRAY ARRAY['billing_customers', 'billing_events'] LOOP
        EXECUTE format(
            'CREATE POLICY %I ON tollhouse.%I FOR SELECT TO tollhouse_user USING ('
            'tollhouse.acting_member_role(%I.tenant_id) IN (''owner'', ''admin''))',
            t || '_manager_read', t, t);
        EXECUTE format('GRANT SELECT ON tollhouse.%I TO tollhouse_user', t);
    END LOOP;
END
$$;

DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'tollhouse.billing_plan_v1(uuid)',
        'tollhouse.billing_effective_plan_v1(uuid)',
        'tollhouse.billing_invoice_allowance_v1(uuid, text)',
        'tollhouse.billing_credit_pack_v1(uuid, text, text, text, bigint, bigint)',
        'tollhouse.billing_refund_pack_v1(uuid, text, bigint)'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tollhouse_service', f);
    END LOOP;
END
$$;
-- The user record shows the effective plan, also when an end user reads it.
GRANT EXECUTE ON FUNCTION tollhouse.billing_plan_v1(uuid) TO tollhouse_user;
