-- Two states of one object stamped with the same Stripe second end alike in either arrival
-- order, for customers, products, prices and invoices as for subscriptions (0009). Stripe
-- stamps events in whole seconds, and a `created` followed by an `updated`, or an invoice's
-- `finalized` and `paid`, often share one: until now the first to arrive stayed, so a price's
-- metadata set right after its creation could be lost, and a paid invoice could stay `open`.
--
-- Customers, products and prices keep `stripe_order`, the kind of event their state came
-- from: 0 `*.created`, 1 `*.updated` (and `stripe sync`'s fetches, which it applies as
-- updates), 2 `*.deleted`. At the same second the later kind wins, then the greater MD5 of
-- the payload (a fixed order: two updates in one second cannot be told apart, but every
-- arrival order keeps the same one). Rows stored before this migration count as updates,
-- deleted customers as deletions.
-- Invoices order their states by status (draft, open, uncollectible, paid, void), then by the
-- payload's MD5. What an older state never does stays: overwrite a newer one (a greater
-- second); and `deleted`, `paid` and `payment_failed` still only ever turn on.

ALTER TABLE tollhouse.billing_customers
    ADD COLUMN stripe_order smallint NOT NULL DEFAULT 1,
    ADD CONSTRAINT billing_customers_stripe_order_check CHECK (stripe_order BETWEEN 0 AND 2);
ALTER TABLE tollhouse.billing_products
    ADD COLUMN stripe_order smallint NOT NULL DEFAULT 1,
    ADD CONSTRAINT billing_products_stripe_order_check CHECK (stripe_order BETWEEN 0 AND 2);
ALTER TABLE tollhouse.billing_prices
    ADD COLUMN stripe_order smallint NOT NULL DEFAULT 1,
    ADD CONSTRAINT billing_prices_stripe_order_check CHECK (stripe_order BETWEEN 0 AND 2);
-- A deleted customer's state came from its deletion. (An inactive product or price may be
-- archived rather than deleted: they stay updates.)
UPDATE tollhouse.billing_customers SET stripe_order = 2 WHERE deleted;

-- The rank of an event type's state at equal Stripe seconds (above).
CREATE FUNCTION tollhouse.billing_stripe_order_v1(p_type text) RETURNS smallint
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN p_type LIKE '%.created' THEN 0 WHEN p_type LIKE '%.deleted' THEN 2 ELSE 1 END;

CREATE OR REPLACE FUNCTION tollhouse.billing_apply_customer_v1(
    p_type text, p_obj jsonb, p_at timestamptz)
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
    -- A newer state replaces the row; an older one can still only turn `deleted` on.
    INSERT INTO tollhouse.billing_customers AS c
        (tenant_id, customer_id, email, name, deleted, stripe_at, stripe_order, raw_data)
    VALUES (v_tenant, v_customer, p_obj ->> 'email', p_obj ->> 'name',
            p_type = 'customer.deleted' OR p_obj -> 'deleted' IS NOT DISTINCT FROM 'true'::jsonb,
            p_at, tollhouse.billing_stripe_order_v1(p_type), p_obj)
    ON CONFLICT (tenant_id, provider, customer_id) DO UPDATE
    SET (email, name, stripe_at, stripe_order, raw_data) = (
            SELECT CASE WHEN n.newer THEN excluded.email ELSE c.email END,
                   CASE WHEN n.newer THEN excluded.name ELSE c.name END,
                   CASE WHEN n.newer THEN excluded.stripe_at ELSE c.stripe_at END,
                   CASE WHEN n.newer THEN excluded.stripe_order ELSE c.stripe_order END,
                   CASE WHEN n.newer THEN excluded.raw_data ELSE c.raw_data END
            FROM (SELECT c.stripe_at IS NULL
                         OR (excluded.stripe_at, excluded.stripe_order,
                             md5(excluded.raw_data::text))
                            > (c.stripe_at, c.stripe_order, coalesce(md5(c.raw_data::text), ''))
                         AS newer) n),
        deleted = c.deleted OR excluded.deleted, updated_at = now()
    WHERE c.stripe_at IS NULL
       OR (excluded.stripe_at, excluded.stripe_order, md5(excluded.raw_data::text))
          > (c.stripe_at, c.stripe_order, coalesce(md5(c.raw_data::text), ''))
       OR (excluded.deleted AND NOT c.deleted);
    RETURN v_tenant;
END
$$;

CREATE OR REPLACE FUNCTION tollhouse.billing_apply_product_v1(
    p_type text, p_obj jsonb, p_at timestamptz)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO tollhouse.billing_products AS pr
        (id, name, active, metadata, stripe_at, stripe_order, raw_data)
    VALUES (tollhouse.billing_ref_v1(p_obj), p_obj ->> 'name',
            coalesce(p_obj -> 'active' NOT IN ('false'::jsonb, 'null'::jsonb), true)
                AND p_type <> 'product.deleted',
            tollhouse.billing_metadata_v1(p_obj), p_at, tollhouse.billing_stripe_order_v1(p_type),
            p_obj)
    ON CONFLICT (id) DO UPDATE
    SET name = excluded.name, active = excluded.active, metadata = excluded.metadata,
        stripe_at = excluded.stripe_at, stripe_order = excluded.stripe_order,
        raw_data = excluded.raw_data, updated_at = now()
    WHERE (excluded.stripe_at, excluded.stripe_order, md5(excluded.raw_data::text))
          > (pr.stripe_at, pr.stripe_order, coalesce(md5(pr.raw_data::text), ''));
END
$$;

CREATE OR REPLACE FUNCTION tollhouse.billing_apply_price_v1(
    p_type text, p_obj jsonb, p_at timestamptz)
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
         lifetime, metadata, stripe_at, stripe_order, raw_data)
    VALUES (v_id, tollhouse.billing_ref_v1(p_obj -> 'product'),
            coalesce(p_obj -> 'active' NOT IN ('false'::jsonb, 'null'::jsonb), true)
                AND p_type <> 'price.deleted',
            p_obj ->> 'type', p_obj ->> 'currency', (p_obj ->> 'unit_amount')::bigint,
            CASE WHEN jsonb_typeof(p_obj -> 'recurring') = 'object'
                 THEN p_obj -> 'recurring' ->> 'interval' END,
            t.plan, t.credits, t.lifetime, tollhouse.billing_metadata_v1(p_obj), p_at,
            tollhouse.billing_stripe_order_v1(p_type), p_obj)
    ON CONFLICT (id) DO UPDATE
    SET product_id = excluded.product_id, active = excluded.active, type = excluded.type,
        currency = excluded.currency, unit_amount = excluded.unit_amount,
        recurring_interval = excluded.recurring_interval, plan = excluded.plan,
        credits = excluded.credits, lifetime = excluded.lifetime, metadata = excluded.metadata,
        stripe_at = excluded.stripe_at, stripe_order = excluded.stripe_order,
        raw_data = excluded.raw_data, updated_at = now()
    WHERE (excluded.stripe_at, excluded.stripe_order, md5(excluded.raw_data::text))
          > (pr.stripe_at, pr.stripe_order, coalesce(md5(pr.raw_data::text), ''));
END
$$;

-- As in 0009, with the same-second order of the states (above).
CREATE OR REPLACE FUNCTION tollhouse.billing_apply_invoice_v1(p_type text, p_obj jsonb, p_at timestamptz)
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
    -- At the same Stripe second, the state further along wins, then a fixed order of the
    -- payloads (as for subscriptions).
    v_lifecycle constant text[] := ARRAY['draft', 'open', 'uncollectible', 'paid', 'void'];
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
    SET status = CASE WHEN (excluded.stripe_at, coalesce(array_position(v_lifecycle, excluded.status), 0),
                           md5(excluded.raw_data::text))
                          > (i.stripe_at, coalesce(array_position(v_lifecycle, i.status), 0),
                             coalesce(md5(i.raw_data::text), ''))
                      THEN excluded.status ELSE i.status END,
        amount_paid = greatest(excluded.amount_paid, i.amount_paid),
        plan = coalesce(i.plan, excluded.plan),
        period_start = coalesce(i.period_start, excluded.period_start),
        period_end = coalesce(i.period_end, excluded.period_end),
        paid = i.paid OR excluded.paid,
        payment_failed = i.payment_failed OR excluded.payment_failed,
        raw_data = CASE WHEN (excluded.stripe_at, coalesce(array_position(v_lifecycle, excluded.status), 0),
                           md5(excluded.raw_data::text))
                          > (i.stripe_at, coalesce(array_position(v_lifecycle, i.status), 0),
                             coalesce(md5(i.raw_data::text), ''))
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

REVOKE ALL ON FUNCTION tollhouse.billing_stripe_order_v1(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tollhouse.billing_stripe_order_v1(text) TO tollhouse_service;
