-- Billing at speed: the handlers of the frequent events (customers, products, prices,
-- subscriptions, invoices, unknown types) move from Python into PL/pgSQL, so that a webhook
-- delivery is one function call, and several deliveries can share one call and one commit
-- (`billing_receive_v1`, the group commit of billing/receiver.py). Python keeps the handlers
-- that may call the Stripe API (Checkout Sessions) and the refunds, and calls the same
-- functions here for what they share: routing and linking a customer, a price's terms, the
-- plan check. Each rule has one implementation.
--
-- A business problem is raised with SQLSTATE TB001 (the event is `failed` with the message);
-- a customer linked to no tenant with TB002 (the event is `parked`, the customer id in DETAIL).

-- Reading Stripe objects ------------------------------------------------------------------------
-- Small PL/pgSQL functions rather than SQL ones: a SQL function with a SET clause is not
-- inlined, and its call costs about 5 us against 0.7 for PL/pgSQL (they run many times an
-- event).

-- An id, whether Stripe sent the id or the expanded object.
CREATE FUNCTION tollhouse.billing_ref_v1(p jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN CASE jsonb_typeof(p)
        WHEN 'string' THEN nullif(p #>> '{}', '')
        WHEN 'object' THEN CASE WHEN jsonb_typeof(p -> 'id') = 'string'
                                THEN nullif(p ->> 'id', '') END
    END;
END
$$;

-- A Stripe Unix timestamp (NULL unless a number; out of range is an error: unreadable).
CREATE FUNCTION tollhouse.billing_ts_v1(p jsonb) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN CASE WHEN jsonb_typeof(p) = 'number' THEN to_timestamp((p #>> '{}')::float8) END;
END
$$;

-- An object's metadata ({} when it has none).
CREATE FUNCTION tollhouse.billing_metadata_v1(p jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN CASE WHEN jsonb_typeof(p -> 'metadata') = 'object' THEN p -> 'metadata'
                ELSE '{}'::jsonb END;
END
$$;

CREATE FUNCTION tollhouse.billing_problem_v1(p_message text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'TB001', MESSAGE = p_message;
END
$$;

-- What a price sells, from its tollhouse_* metadata.
CREATE FUNCTION tollhouse.billing_price_terms_v1(
    p_price jsonb, OUT plan text, OUT credits bigint, OUT lifetime boolean)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m jsonb := tollhouse.billing_metadata_v1(p_price);
    v_credits text := m ->> 'tollhouse_credits';
BEGIN
    plan := nullif(m ->> 'tollhouse_plan', '');
    IF coalesce(v_credits, '') <> '' THEN
        IF v_credits !~ '^[0-9]{1,18}$' OR v_credits::bigint <= 0 THEN
            PERFORM tollhouse.billing_problem_v1(format(
                'price %s: tollhouse_credits must be a positive integer', p_price ->> 'id'));
        END IF;
        credits := v_credits::bigint;
    END IF;
    lifetime := lower(coalesce(m ->> 'tollhouse_lifetime', '')) = 'true';
    IF lifetime AND plan IS NULL THEN
        PERFORM tollhouse.billing_problem_v1(format(
            'price %s: tollhouse_lifetime needs tollhouse_plan', p_price ->> 'id'));
    END IF;
END
$$;

-- A price's id and terms: from the object's own metadata, else from the synced prices.
-- `p_price` is the expanded price, or its id as a JSON string.
CREATE FUNCTION tollhouse.billing_resolve_price_v1(
    p_price jsonb, OUT id text, OUT plan text, OUT credits bigint, OUT lifetime boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    id := tollhouse.billing_ref_v1(p_price);
    lifetime := false;
    IF jsonb_typeof(p_price) = 'object' THEN
        SELECT t.plan, t.credits, t.lifetime INTO plan, credits, lifetime
        FROM tollhouse.billing_price_terms_v1(p_price) t;
        IF plan IS NOT NULL OR credits IS NOT NULL THEN
            RETURN;
        END IF;
        lifetime := false;
    END IF;
    IF id IS NOT NULL THEN
        SELECT pr.plan, pr.credits, pr.lifetime INTO plan, credits, lifetime
        FROM tollhouse.billing_prices pr WHERE pr.id = billing_resolve_price_v1.id;
        lifetime := coalesce(lifetime, false);
    END IF;
END
$$;

CREATE FUNCTION tollhouse.billing_known_plan_v1(p_plan text, p_what text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_plan IS NOT NULL AND NOT EXISTS (SELECT 1 FROM tollhouse.plans WHERE name = p_plan) THEN
        PERFORM tollhouse.billing_problem_v1(format('%s names the unknown plan %L', p_what, p_plan));
    END IF;
    RETURN p_plan;
END
$$;

-- Customers and tenants -------------------------------------------------------------------------

-- The customer's tenant (or NULL), after taking the customer's transaction-level lock: every
-- transaction that reads or makes a customer's link is serialized on it, so an event that
-- finds no link parks only once the linking transaction is out of the way (before it: the
-- link's unparking sees it; after it: the event sees the link).
CREATE FUNCTION tollhouse.billing_route_v1(p_customer text) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_customer IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('tollhouse.stripe_customer:' || p_customer, 0));
    RETURN (SELECT r.tenant_id FROM tollhouse.billing_customer_routes r
            WHERE r.provider = 'stripe' AND r.customer_id = p_customer);
END
$$;

-- The customer's tenant, or TB002 (parked: no user is ever created from a webhook).
CREATE FUNCTION tollhouse.billing_tenant_for_v1(p_customer text) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant uuid;
BEGIN
    IF p_customer IS NULL THEN
        PERFORM tollhouse.billing_problem_v1('the object names no customer');
    END IF;
    v_tenant := tollhouse.billing_route_v1(p_customer);
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'TB002', MESSAGE = 'parked', DETAIL = p_customer;
    END IF;
    RETURN v_tenant;
END
$$;

-- Links a customer to a tenant; true when this call made the link. The first link wins: a
-- customer linked to another tenant is a problem, never re-pointed.
CREATE FUNCTION tollhouse.billing_link_v1(p_customer text, p_tenant uuid) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_current uuid := tollhouse.billing_route_v1(p_customer);
BEGIN
    IF v_current IS NULL THEN
        INSERT INTO tollhouse.billing_customer_routes (customer_id, tenant_id)
        VALUES (p_customer, p_tenant);
        INSERT INTO tollhouse.billing_customers (tenant_id, customer_id)
        VALUES (p_tenant, p_customer)
        ON CONFLICT (tenant_id, provider, customer_id) DO NOTHING;
        RETURN true;
    END IF;
    IF v_current <> p_tenant THEN
        PERFORM tollhouse.billing_problem_v1(
            format('customer %s is linked to another tenant', p_customer));
    END IF;
    RETURN false;
END
$$;

-- The tenant a Checkout reference names: a tenant id, or a user id standing for its personal
-- tenant (NULL when it names neither).
CREATE FUNCTION tollhouse.billing_reference_tenant_v1(p_reference text) RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ref uuid;
BEGIN
    IF p_reference IS NULL OR p_reference !~*
        '^(urn:uuid:)?\{?[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}\}?$' THEN
        RETURN NULL;
    END IF;
    v_ref := regexp_replace(p_reference, '^urn:uuid:', '', 'i')::uuid;
    RETURN (SELECT t.id FROM tollhouse.tenants t
            LEFT JOIN tollhouse.users u ON u.id = t.owner_user_id
            WHERE t.deleted_at IS NULL
              AND (t.id = v_ref OR (t.owner_user_id = v_ref AND t.is_default
                                    AND u.deleted_at IS NULL))
            ORDER BY t.id = v_ref DESC
            LIMIT 1);
END
$$;

-- Moves the tenant's credits to its effective plan (a no-op when it is there already).
CREATE FUNCTION tollhouse.billing_sync_plan_v1(p_tenant uuid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM tollhouse.credit_change_plan_v1(
        p_tenant, NULL, tollhouse.billing_effective_plan_v1(p_tenant));
END
$$;

-- The handlers ----------------------------------------------------------------------------------
-- Each applies one object as of Stripe time `p_at` inside the caller's transaction and
-- returns the tenant it concerned (NULL for products and prices). Every write is an upsert
-- that keeps the newer state (docs/billing.md, Order independence).

CREATE FUNCTION tollhouse.billing_apply_customer_v1(p_type text, p_obj jsonb, p_at timestamptz)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_customer text := tollhouse.billing_ref_v1(p_obj);
    m jsonb := tollhouse.billing_metadata_v1(p_obj);
    v_tenant uuid;
BEGIN
    IF v_customer IS NULL THEN
        PERFORM tollhouse.billing_problem_v1('the customer has no id');
    END IF;
    v_tenant := tollhouse.billing_route_v1(v_customer);
    IF v_tenant IS NULL THEN
        -- Its metadata may name the tenant (customers we create carry tollhouse_tenant_id).
        v_tenant := tollhouse.billing_reference_tenant_v1(coalesce(
            nullif(m ->> 'tollhouse_tenant_id', ''), nullif(m ->> 'tollhouse_user_id', '')));
        IF v_tenant IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'TB002', MESSAGE = 'parked', DETAIL = v_customer;
        END IF;
        PERFORM tollhouse.billing_link_v1(v_customer, v_tenant);
    END IF;
    INSERT INTO tollhouse.billing_customers AS c
        (tenant_id, customer_id, email, name, deleted, stripe_at, raw_data)
    VALUES (v_tenant, v_customer, p_obj ->> 'email', p_obj ->> 'name',
            p_type = 'customer.deleted' OR p_obj -> 'deleted' IS NOT DISTINCT FROM 'true'::jsonb, p_at, p_obj)
    ON CONFLICT (tenant_id, provider, customer_id) DO UPDATE
    SET email = excluded.email, name = excluded.name, deleted = c.deleted OR excluded.deleted,
        stripe_at = excluded.stripe_at, raw_data = excluded.raw_data, updated_at = now()
    WHERE c.stripe_at IS NULL OR excluded.stripe_at > c.stripe_at
       OR (excluded.deleted AND NOT c.deleted);
    RETURN v_tenant;
END
$$;

CREATE FUNCTION tollhouse.billing_apply_product_v1(p_type text, p_obj jsonb, p_at timestamptz)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO tollhouse.billing_products AS pr (id, name, active, metadata, stripe_at, raw_data)
    VALUES (tollhouse.billing_ref_v1(p_obj), p_obj ->> 'name',
            coalesce(p_obj -> 'active' NOT IN ('false'::jsonb, 'null'::jsonb), true)
                AND p_type <> 'product.deleted',
            tollhouse.billing_metadata_v1(p_obj), p_at, p_obj)
    ON CONFLICT (id) DO UPDATE
    SET name = excluded.name, active = excluded.active, metadata = excluded.metadata,
        stripe_at = excluded.stripe_at, raw_data = excluded.raw_data, updated_at = now()
    WHERE excluded.stripe_at > pr.stripe_at;
END
$$;

CREATE FUNCTION tollhouse.billing_apply_price_v1(p_type text, p_obj jsonb, p_at timestamptz)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    v_id text := tollhouse.billing_ref_v1(p_obj);
BEGIN
    SELECT * INTO t FROM tollhouse.billing_price_terms_v1(p_obj);
    PERFORM tollhouse.billing_known_plan_v1(t.plan, format('price %s', v_id));
    INSERT INTO tollhouse.billing_prices AS pr
        (id, product_id, active, type, currency, unit_amount, recurring_interval, plan, credits,
         lifetime, metadata, stripe_at, raw_data)
    VALUES (v_id, tollhouse.billing_ref_v1(p_obj -> 'product'),
            coalesce(p_obj -> 'active' NOT IN ('false'::jsonb, 'null'::jsonb), true)
                AND p_type <> 'price.deleted',
            p_obj ->> 'type', p_obj ->> 'currency', (p_obj ->> 'unit_amount')::bigint,
            CASE WHEN jsonb_typeof(p_obj -> 'recurring') = 'object'
                 THEN p_obj -> 'recurring' ->> 'interval' END,
            t.plan, t.credits, t.lifetime, tollhouse.billing_metadata_v1(p_obj), p_at, p_obj)
    ON CONFLICT (id) DO UPDATE
    SET product_id = excluded.product_id, active = excluded.active, type = excluded.type,
        currency = excluded.currency, unit_amount = excluded.unit_amount,
        recurring_interval = excluded.recurring_interval, plan = excluded.plan,
        credits = excluded.credits, lifetime = excluded.lifetime, metadata = excluded.metadata,
        stripe_at = excluded.stripe_at, raw_data = excluded.raw_data, updated_at = now()
    WHERE excluded.stripe_at > pr.stripe_at;
END
$$;

-- A subscription: its plan from its (first) item's price, its period from the subscription
-- (API versions before 2025-03-31) or from that item (later ones).
CREATE FUNCTION tollhouse.billing_apply_subscription_v1(
    p_type text, p_obj jsonb, p_at timestamptz) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_customer text := tollhouse.billing_ref_v1(p_obj -> 'customer');
    v_tenant uuid := tollhouse.billing_tenant_for_v1(v_customer);
    v_item jsonb := CASE WHEN jsonb_typeof(p_obj -> 'items' -> 'data' -> 0) = 'object'
                         THEN p_obj -> 'items' -> 'data' -> 0 ELSE '{}'::jsonb END;
    pr record;
    -- Applies only a newer state. Stripe stamps events in whole seconds, so at the same
    -- second the state further along the lifecycle wins, then a fixed order of the payloads:
    -- whatever the arrival order, the same state stays.
    v_lifecycle constant text[] := ARRAY['incomplete', 'trialing', 'active', 'past_due',
                                         'unpaid', 'paused', 'incomplete_expired', 'canceled'];
BEGIN
    SELECT * INTO pr FROM tollhouse.billing_resolve_price_v1(v_item -> 'price');
    IF pr.id IS NULL OR pr.plan IS NULL THEN
        PERFORM tollhouse.billing_problem_v1(
            format('unknown price %s: no tollhouse_plan in its metadata', coalesce(pr.id, 'None')));
    END IF;
    PERFORM tollhouse.billing_known_plan_v1(pr.plan, format('price %s', pr.id));
    INSERT INTO tollhouse.subscriptions AS s
        (tenant_id, id, customer_id, status, plan, price_id, amount, currency,
         current_period_start, current_period_end, trial_end, cancel_at_period_end, canceled_at,
         ended_at, metadata, raw_data, stripe_at)
    VALUES (v_tenant, tollhouse.billing_ref_v1(p_obj), v_customer,
            CASE WHEN p_type = 'customer.subscription.deleted' THEN 'canceled'
                 ELSE p_obj ->> 'status' END,
            pr.plan, pr.id,
            CASE WHEN jsonb_typeof(v_item -> 'price') = 'object'
                 THEN (v_item -> 'price' ->> 'unit_amount')::bigint END,
            p_obj ->> 'currency',
            coalesce(tollhouse.billing_ts_v1(p_obj -> 'current_period_start'),
                     tollhouse.billing_ts_v1(v_item -> 'current_period_start')),
            coalesce(tollhouse.billing_ts_v1(p_obj -> 'current_period_end'),
                     tollhouse.billing_ts_v1(v_item -> 'current_period_end')),
            tollhouse.billing_ts_v1(p_obj -> 'trial_end'),
            p_obj -> 'cancel_at_period_end' IS NOT DISTINCT FROM 'true'::jsonb,
            tollhouse.billing_ts_v1(p_obj -> 'canceled_at'),
            tollhouse.billing_ts_v1(p_obj -> 'ended_at'),
            tollhouse.billing_metadata_v1(p_obj), p_obj, p_at)
    ON CONFLICT (tenant_id, id) DO UPDATE
    SET customer_id = excluded.customer_id, status = excluded.status, plan = excluded.plan,
        price_id = excluded.price_id, amount = excluded.amount, currency = excluded.currency,
        current_period_start = excluded.current_period_start,
        current_period_end = excluded.current_period_end, trial_end = excluded.trial_end,
        cancel_at_period_end = excluded.cancel_at_period_end,
        canceled_at = excluded.canceled_at, ended_at = excluded.ended_at,
        metadata = excluded.metadata, raw_data = excluded.raw_data,
        stripe_at = excluded.stripe_at, updated_at = now()
    WHERE (excluded.stripe_at, array_position(v_lifecycle, excluded.status),
           coalesce(md5(excluded.raw_data::text), ''))
          > (s.stripe_at, array_position(v_lifecycle, s.status),
             coalesce(md5(s.raw_data::text), ''))
      -- A canceled subscription stays canceled (Stripe never revives one).
      AND (s.status <> 'canceled' OR excluded.status = 'canceled');
    -- An older state changes nothing, so it cannot move the effective plan either.
    IF FOUND THEN
        PERFORM tollhouse.billing_sync_plan_v1(v_tenant);
    END IF;
    RETURN v_tenant;
END
$$;

-- An invoice: the newest status wins, `paid` and `payment_failed` only ever turn on, and the
-- period and plan, once known, stay. A paid subscription invoice grants the allowance of its
-- plan once (billing_invoice_allowance_v1). The period is that of its subscription line
-- (the invoice's own period_start/end describe the previous period for renewals).
CREATE FUNCTION tollhouse.billing_apply_invoice_v1(p_type text, p_obj jsonb, p_at timestamptz)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_customer text := tollhouse.billing_ref_v1(p_obj -> 'customer');
    v_tenant uuid := tollhouse.billing_tenant_for_v1(v_customer);
    v_id text := tollhouse.billing_ref_v1(p_obj);
    v_lines jsonb := p_obj -> 'lines' -> 'data';
    v_line jsonb;
    v_subscription text;
    v_price jsonb;
    v_period jsonb;
    v_paid boolean;
    pr record;
    v_plan text;
    v_replayed boolean;
BEGIN
    -- The subscription line, else the first line.
    SELECT l INTO v_line FROM jsonb_array_elements(
        CASE WHEN jsonb_typeof(v_lines) = 'array' THEN v_lines ELSE '[]'::jsonb END)
        WITH ORDINALITY AS x (l, n)
    ORDER BY (l ->> 'type' = 'subscription'
              OR l -> 'parent' ->> 'type' = 'subscription_item_details') IS TRUE DESC, n
    LIMIT 1;
    v_line := coalesce(v_line, '{}'::jsonb);
    v_subscription := coalesce(
        tollhouse.billing_ref_v1(p_obj -> 'subscription'),
        tollhouse.billing_ref_v1(p_obj -> 'parent' -> 'subscription_details' -> 'subscription'),
        tollhouse.billing_ref_v1(v_line -> 'subscription'));
    -- The line's price: an object (older APIs), or an id under `pricing` (newer).
    v_price := CASE WHEN jsonb_typeof(v_line -> 'price') = 'object' THEN v_line -> 'price'
                    ELSE to_jsonb(coalesce(
                        tollhouse.billing_ref_v1(v_line -> 'pricing' -> 'price_details' -> 'price'),
                        tollhouse.billing_ref_v1(v_line -> 'price'))) END;
    SELECT * INTO pr FROM tollhouse.billing_resolve_price_v1(v_price);
    v_plan := pr.plan;
    IF v_plan IS NULL AND v_subscription IS NOT NULL THEN
        SELECT s.plan INTO v_plan FROM tollhouse.subscriptions s
        WHERE s.tenant_id = v_tenant AND s.id = v_subscription;
    END IF;
    v_paid := p_type IN ('invoice.paid', 'invoice.payment_succeeded')
              OR p_obj ->> 'status' IS NOT DISTINCT FROM 'paid';
    IF v_paid AND v_subscription IS NOT NULL AND v_plan IS NULL THEN
        PERFORM tollhouse.billing_problem_v1(format(
            'unknown price %s: the invoice''s plan cannot be told', coalesce(pr.id, 'None')));
    END IF;
    PERFORM tollhouse.billing_known_plan_v1(v_plan, format('invoice %s', v_id));
    v_period := CASE WHEN jsonb_typeof(v_line -> 'period') = 'object'
                     THEN v_line -> 'period' ELSE '{}'::jsonb END;
    INSERT INTO tollhouse.invoices AS i
        (tenant_id, id, customer_id, subscription_id, status, plan, amount_due, amount_paid,
         currency, period_start, period_end, paid, payment_failed, hosted_invoice_url, raw_data,
         stripe_at)
    VALUES (v_tenant, v_id, v_customer, v_subscription, p_obj ->> 'status', v_plan,
            (p_obj ->> 'amount_due')::bigint, (p_obj ->> 'amount_paid')::bigint,
            p_obj ->> 'currency',
            coalesce(tollhouse.billing_ts_v1(v_period -> 'start'),
                     tollhouse.billing_ts_v1(p_obj -> 'period_start')),
            coalesce(tollhouse.billing_ts_v1(v_period -> 'end'),
                     tollhouse.billing_ts_v1(p_obj -> 'period_end')),
            v_paid, p_type = 'invoice.payment_failed', p_obj ->> 'hosted_invoice_url', p_obj,
            p_at)
    ON CONFLICT (tenant_id, id) DO UPDATE
    SET status = CASE WHEN excluded.stripe_at > i.stripe_at THEN excluded.status ELSE i.status END,
        amount_paid = greatest(excluded.amount_paid, i.amount_paid),
        plan = coalesce(i.plan, excluded.plan),
        period_start = coalesce(i.period_start, excluded.period_start),
        period_end = coalesce(i.period_end, excluded.period_end),
        paid = i.paid OR excluded.paid,
        payment_failed = i.payment_failed OR excluded.payment_failed,
        raw_data = CASE WHEN excluded.stripe_at > i.stripe_at
                        THEN excluded.raw_data ELSE i.raw_data END,
        stripe_at = greatest(excluded.stripe_at, i.stripe_at), updated_at = now();
    IF v_paid AND v_subscription IS NOT NULL THEN
        SELECT a.replayed INTO v_replayed
        FROM tollhouse.billing_invoice_allowance_v1(v_tenant, v_id) a;
        -- A replayed allowance was followed by this move when it was granted.
        IF v_replayed IS NOT TRUE THEN
            PERFORM tollhouse.billing_sync_plan_v1(v_tenant);
        END IF;
    END IF;
    RETURN v_tenant;
END
$$;

-- Applies one object under an event type: its status (`processed`, or `ignored` for a type
-- no handler here takes), the tenant and the customer it concerned. TB001 / TB002 as above.
-- Checkout Sessions and refunds are applied by billing/handlers.py, never passed here.
CREATE FUNCTION tollhouse.billing_apply_v1(
    p_type text, p_obj jsonb, p_at timestamptz,
    OUT status text, OUT tenant_id uuid, OUT customer_id text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    status := 'processed';
    IF p_type LIKE 'customer.subscription.%' THEN
        IF p_type NOT IN ('customer.subscription.created', 'customer.subscription.updated',
                          'customer.subscription.deleted',
                          'customer.subscription.trial_will_end',
                          'customer.subscription.paused', 'customer.subscription.resumed') THEN
            status := 'ignored';
            RETURN;
        END IF;
        tenant_id := tollhouse.billing_apply_subscription_v1(p_type, p_obj, p_at);
        customer_id := tollhouse.billing_ref_v1(p_obj -> 'customer');
    ELSIF p_type IN ('customer.created', 'customer.updated', 'customer.deleted') THEN
        tenant_id := tollhouse.billing_apply_customer_v1(p_type, p_obj, p_at);
        customer_id := tollhouse.billing_ref_v1(p_obj);
    ELSIF p_type IN ('invoice.created', 'invoice.finalized', 'invoice.updated', 'invoice.paid',
                     'invoice.payment_succeeded', 'invoice.payment_failed', 'invoice.voided',
                     'invoice.marked_uncollectible') THEN
        tenant_id := tollhouse.billing_apply_invoice_v1(p_type, p_obj, p_at);
        customer_id := tollhouse.billing_ref_v1(p_obj -> 'customer');
    ELSIF p_type IN ('price.created', 'price.updated', 'price.deleted') THEN
        PERFORM tollhouse.billing_apply_price_v1(p_type, p_obj, p_at);
    ELSIF p_type IN ('product.created', 'product.updated', 'product.deleted') THEN
        PERFORM tollhouse.billing_apply_product_v1(p_type, p_obj, p_at);
    ELSE
        status := 'ignored';
    END IF;
END
$$;

-- Events ----------------------------------------------------------------------------------------

-- Applies one object in a subtransaction and tells its outcome: a business problem, or an
-- object that cannot be read, rolls the subtransaction back and is `failed` with the reason;
-- a customer of no tenant is `parked`. Deadlocks and serialization failures go up: the
-- caller's transaction runs again.
CREATE FUNCTION tollhouse.billing_try_apply_v1(
    p_type text, p_obj jsonb, p_at timestamptz, p_customer text,
    OUT status text, OUT error text, OUT tenant_id uuid, OUT customer_id text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_state text;
BEGIN
    customer_id := p_customer;
    BEGIN
        SELECT a.status, a.tenant_id, coalesce(a.customer_id, p_customer)
        INTO status, tenant_id, customer_id
        FROM tollhouse.billing_apply_v1(p_type, p_obj, p_at) a;
    EXCEPTION
        WHEN SQLSTATE 'TB002' THEN
            GET STACKED DIAGNOSTICS customer_id = PG_EXCEPTION_DETAIL;
            status := 'parked';
        WHEN SQLSTATE 'TB001' THEN
            status := 'failed';
            error := SQLERRM;
        WHEN OTHERS THEN
            v_state := SQLSTATE;
            IF v_state IN ('40001', '40P01') THEN
                RAISE;
            END IF;
            status := 'failed';
            -- A signed object we cannot read (an impossible timestamp, a number that is not
            -- one): kept as failed with the reason, never an error that loses it.
            error := CASE WHEN v_state LIKE '22%' THEN format('unreadable %s: %s', p_type, SQLERRM)
                          ELSE SQLERRM END;
    END;
END
$$;

-- Whether a customer, linked now, has parked events waiting (other than `p_id`).
CREATE FUNCTION tollhouse.billing_parked_waiting_v1(p_customer text, p_id text) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN p_customer IS NOT NULL AND EXISTS (
        SELECT 1 FROM tollhouse.billing_events p
        WHERE p.status = 'parked' AND p.customer_id = p_customer AND p.stripe_event_id <> p_id);
END
$$;

-- Records a stored event's outcome; returns whether its customer, now linked, has parked
-- events to apply (the caller applies them in the same transaction).
CREATE FUNCTION tollhouse.billing_finish_event_v1(
    p_id text, p_status text, p_error text, p_tenant uuid, p_customer text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_customer text;
BEGIN
    UPDATE tollhouse.billing_events e
    SET status = p_status, last_error = p_error, tenant_id = p_tenant,
        customer_id = coalesce(p_customer, e.customer_id),
        user_id = (SELECT t.owner_user_id FROM tollhouse.tenants t
                   WHERE t.id = p_tenant AND t.is_default),
        attempts = e.attempts + 1, processed_at = now()
    WHERE e.stripe_event_id = p_id
    RETURNING e.customer_id INTO v_customer;
    RETURN p_status = 'processed' AND p_tenant IS NOT NULL
        AND tollhouse.billing_parked_waiting_v1(v_customer, p_id);
END
$$;

-- Applies a stored (and locked) event again (a retry, a replay, an unparking) and records
-- its outcome; `unpark`: its customer, now linked, has parked events to apply.
CREATE FUNCTION tollhouse.billing_process_v1(
    p_id text, p_type text, p_obj jsonb, p_at timestamptz, p_customer text,
    OUT status text, OUT error text, OUT tenant_id uuid, OUT customer_id text,
    OUT unpark boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT * INTO status, error, tenant_id, customer_id
    FROM tollhouse.billing_try_apply_v1(p_type, p_obj, p_at, p_customer);
    unpark := tollhouse.billing_finish_event_v1(p_id, status, error, tenant_id, customer_id);
END
$$;

-- `source`: `webhook`, or `api` for an event read from Stripe's API (`tollhouse stripe sync`
-- pages /v1/events, RELIABILITY W-12), stored and applied like a delivery. Its body is our
-- serialisation, not the one Stripe signed, so a later webhook delivery of the same id is a
-- duplicate by its id (never a conflict), and so is an API copy of an event delivered before.
ALTER TABLE tollhouse.billing_events
    ADD COLUMN source text NOT NULL DEFAULT 'webhook',
    ADD CONSTRAINT billing_events_source_check CHECK (source IN ('webhook', 'api'));

-- Receives a batch of verified deliveries (`p_events`: a JSON array of the raw bodies, with
-- each body's SHA-256 and customer), in order, one row each. A delivery takes its event id's
-- lock (which the Python path takes too, billing/queries.sql store_event), so a concurrent
-- delivery of the same id waits until this transaction ends and then sees it: the same body
-- again is a `duplicate`, another body a recorded `conflict`, never applied. A new event is
-- applied in its own subtransaction and stored once, with its outcome.
-- `p_unpark`: the caller will apply, in this transaction, the parked events of customers the
-- batch linked (the `unpark` column); without it, such a batch raises TB003 and changes
-- nothing, and the caller sends it again in a transaction of its own (rare: a customer's
-- first link). `p_source` is stored with each new event (`api`: read by `stripe sync`).
CREATE FUNCTION tollhouse.billing_receive_v1(
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
BEGIN
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
        'tollhouse.billing_ref_v1(jsonb)',
        'tollhouse.billing_ts_v1(jsonb)',
        'tollhouse.billing_metadata_v1(jsonb)',
        'tollhouse.billing_problem_v1(text)',
        'tollhouse.billing_price_terms_v1(jsonb)',
        'tollhouse.billing_resolve_price_v1(jsonb)',
        'tollhouse.billing_known_plan_v1(text, text)',
        'tollhouse.billing_route_v1(text)',
        'tollhouse.billing_tenant_for_v1(text)',
        'tollhouse.billing_link_v1(text, uuid)',
        'tollhouse.billing_reference_tenant_v1(text)',
        'tollhouse.billing_sync_plan_v1(uuid)',
        'tollhouse.billing_apply_customer_v1(text, jsonb, timestamptz)',
        'tollhouse.billing_apply_product_v1(text, jsonb, timestamptz)',
        'tollhouse.billing_apply_price_v1(text, jsonb, timestamptz)',
        'tollhouse.billing_apply_subscription_v1(text, jsonb, timestamptz)',
        'tollhouse.billing_apply_invoice_v1(text, jsonb, timestamptz)',
        'tollhouse.billing_apply_v1(text, jsonb, timestamptz)',
        'tollhouse.billing_try_apply_v1(text, jsonb, timestamptz, text)',
        'tollhouse.billing_parked_waiting_v1(text, text)',
        'tollhouse.billing_finish_event_v1(text, text, text, uuid, text)',
        'tollhouse.billing_process_v1(text, text, jsonb, timestamptz, text)',
        'tollhouse.billing_receive_v1(jsonb, text[], text[], boolean, text)'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tollhouse_service', f);
    END LOOP;
END
$$;
