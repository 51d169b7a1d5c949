-- Billing (tollhouse.billing). Each synced row is written by one upsert that applies only a
-- newer Stripe state (`stripe_at`); money goes through the functions of migration 0006.

-- name: store_event
INSERT INTO tollhouse.billing_events
    (stripe_event_id, type, payload_hash, payload, event_created, customer_id)
VALUES (%(id)s, %(type)s, %(hash)s, %(payload)s, %(created)s, %(customer_id)s)
ON CONFLICT (stripe_event_id) DO NOTHING
RETURNING stripe_event_id

-- name: event_hash
SELECT payload_hash, status FROM tollhouse.billing_events WHERE stripe_event_id = %(id)s

-- name: record_conflict
INSERT INTO tollhouse.billing_event_conflicts (stripe_event_id, payload_hash)
VALUES (%(id)s, %(hash)s)
ON CONFLICT (stripe_event_id, payload_hash) DO UPDATE
SET deliveries = billing_event_conflicts.deliveries + 1, last_at = now()

-- name: lock_event
SELECT stripe_event_id, type, status, payload FROM tollhouse.billing_events
WHERE stripe_event_id = %(id)s FOR UPDATE

-- name: finish_event
UPDATE tollhouse.billing_events
SET status = %(status)s, last_error = %(error)s, tenant_id = %(tenant_id)s,
    customer_id = coalesce(%(customer_id)s, customer_id),
    user_id = (SELECT t.owner_user_id FROM tollhouse.tenants t
               WHERE t.id = %(tenant_id)s AND t.is_default),
    attempts = attempts + 1, processed_at = now()
WHERE stripe_event_id = %(id)s
-- Whether the customer has parked events to apply now (one round trip for both).
RETURNING EXISTS (SELECT 1 FROM tollhouse.billing_events p
                  WHERE p.status = 'parked' AND p.customer_id = billing_events.customer_id
                    AND p.stripe_event_id <> billing_events.stripe_event_id)

-- name: parked_events
SELECT stripe_event_id, type, status, payload FROM tollhouse.billing_events
WHERE status = 'parked' AND customer_id = %(customer_id)s
ORDER BY event_created, stripe_event_id
FOR UPDATE

-- name: events
SELECT stripe_event_id, type, status, tenant_id, user_id, customer_id, attempts, last_error,
       event_created, received_at, processed_at
FROM tollhouse.billing_events
WHERE (%(status)s::text IS NULL OR status = %(status)s)
ORDER BY received_at DESC, stripe_event_id
LIMIT %(limit)s

-- name: event_ids_by_status
SELECT stripe_event_id FROM tollhouse.billing_events
WHERE status = %(status)s ORDER BY event_created, stripe_event_id

-- name: event
SELECT stripe_event_id, type, status, tenant_id, user_id, customer_id, attempts, last_error,
       event_created, received_at, processed_at
FROM tollhouse.billing_events WHERE stripe_event_id = %(id)s

-- name: route
SELECT tenant_id FROM tollhouse.billing_customer_routes
WHERE provider = 'stripe' AND customer_id = %(customer_id)s

-- name: lock_customer
-- Held to the end of the transaction (see handlers._lock_customer).
SELECT pg_advisory_xact_lock(hashtextextended('tollhouse.stripe_customer:' || %(customer_id)s, 0))

-- name: link_customer
-- The route decides: a customer already linked keeps its tenant.
WITH route AS (
    INSERT INTO tollhouse.billing_customer_routes (customer_id, tenant_id)
    VALUES (%(customer_id)s, %(tenant_id)s)
    ON CONFLICT (provider, customer_id) DO NOTHING
    RETURNING tenant_id
), customer AS (
    INSERT INTO tollhouse.billing_customers (tenant_id, customer_id)
    SELECT tenant_id, %(customer_id)s FROM route
    ON CONFLICT (tenant_id, provider, customer_id) DO NOTHING
)
SELECT tenant_id, true AS linked FROM route

-- name: tenant_of_reference
-- A Checkout reference: a tenant id, or a user id standing for its personal tenant.
SELECT t.id FROM tollhouse.tenants t
LEFT JOIN tollhouse.users u ON u.id = t.owner_user_id
WHERE t.deleted_at IS NULL
  AND (t.id = %(ref)s OR (t.owner_user_id = %(ref)s AND t.is_default AND u.deleted_at IS NULL))
ORDER BY t.id = %(ref)s DESC
LIMIT 1

-- name: upsert_customer
INSERT INTO tollhouse.billing_customers
    (tenant_id, customer_id, email, name, deleted, stripe_at, raw_data)
VALUES (%(tenant_id)s, %(customer_id)s, %(email)s, %(name)s, %(deleted)s, %(at)s, %(raw)s)
ON CONFLICT (tenant_id, provider, customer_id) DO UPDATE
SET email = excluded.email, name = excluded.name,
    deleted = billing_customers.deleted OR excluded.deleted,
    stripe_at = excluded.stripe_at, raw_data = excluded.raw_data, updated_at = now()
WHERE billing_customers.stripe_at IS NULL OR excluded.stripe_at > billing_customers.stripe_at
   OR (excluded.deleted AND NOT billing_customers.deleted)

-- name: upsert_product
INSERT INTO tollhouse.billing_products (id, name, active, metadata, stripe_at, raw_data)
VALUES (%(id)s, %(name)s, %(active)s, %(metadata)s, %(at)s, %(raw)s)
ON CONFLICT (id) DO UPDATE
SET name = excluded.name, active = excluded.active, metadata = excluded.metadata,
    stripe_at = excluded.stripe_at, raw_data = excluded.raw_data, updated_at = now()
WHERE excluded.stripe_at > billing_products.stripe_at

-- name: upsert_price
INSERT INTO tollhouse.billing_prices
    (id, product_id, active, type, currency, unit_amount, recurring_interval, plan, credits,
     lifetime, metadata, stripe_at, raw_data)
VALUES (%(id)s, %(product_id)s, %(active)s, %(type)s, %(currency)s, %(unit_amount)s,
        %(interval)s, %(plan)s, %(credits)s, %(lifetime)s, %(metadata)s, %(at)s, %(raw)s)
ON CONFLICT (id) DO UPDATE
SET product_id = excluded.product_id, active = excluded.active, type = excluded.type,
    currency = excluded.currency, unit_amount = excluded.unit_amount,
    recurring_interval = excluded.recurring_interval, plan = excluded.plan,
    credits = excluded.credits, lifetime = excluded.lifetime, metadata = excluded.metadata,
    stripe_at = excluded.stripe_at, raw_data = excluded.raw_data, updated_at = now()
WHERE excluded.stripe_at > billing_prices.stripe_at

-- name: price
SELECT id, plan, credits, lifetime, type, active FROM tollhouse.billing_prices
WHERE id = %(id)s

-- name: plan_exists
SELECT 1 FROM tollhouse.plans WHERE name = %(plan)s

-- name: upsert_subscription
-- Applies only a newer state. Stripe stamps events in whole seconds, so at the same second
-- the state further along the lifecycle wins (incomplete < trialing < active < past_due <
-- unpaid < paused < incomplete_expired < canceled), then a fixed order of the payloads:
-- whatever the arrival order, the same state stays. A canceled subscription stays canceled
-- (Stripe never revives one).
INSERT INTO tollhouse.subscriptions
    (tenant_id, id, customer_id, status, plan, price_id, amount, currency,
     current_period_start, current_period_end, trial_end, cancel_at_period_end, canceled_at,
     ended_at, metadata, raw_data, stripe_at)
VALUES (%(tenant_id)s, %(id)s, %(customer_id)s, %(status)s, %(plan)s, %(price_id)s,
        %(amount)s, %(currency)s, %(period_start)s, %(period_end)s, %(trial_end)s,
        %(cancel_at_period_end)s, %(canceled_at)s, %(ended_at)s, %(metadata)s, %(raw)s, %(at)s)
ON CONFLICT (tenant_id, id) DO UPDATE
SET customer_id = excluded.customer_id, status = excluded.status, plan = excluded.plan,
    price_id = excluded.price_id, amount = excluded.amount, currency = excluded.currency,
    current_period_start = excluded.current_period_start,
    current_period_end = excluded.current_period_end, trial_end = excluded.trial_end,
    cancel_at_period_end = excluded.cancel_at_period_end, canceled_at = excluded.canceled_at,
    ended_at = excluded.ended_at, metadata = excluded.metadata, raw_data = excluded.raw_data,
    stripe_at = excluded.stripe_at, updated_at = now()
WHERE (excluded.stripe_at,
       array_position(ARRAY['incomplete', 'trialing', 'active', 'past_due', 'unpaid', 'paused',
                            'incomplete_expired', 'canceled'], excluded.status),
       coalesce(md5(excluded.raw_data::text), ''))
      > (subscriptions.stripe_at,
         array_position(ARRAY['incomplete', 'trialing', 'active', 'past_due', 'unpaid', 'paused',
                              'incomplete_expired', 'canceled'], subscriptions.status),
         coalesce(md5(subscriptions.raw_data::text), ''))
  AND (subscriptions.status <> 'canceled' OR excluded.status = 'canceled')
RETURNING id

-- name: subscription_plan
SELECT plan FROM tollhouse.subscriptions WHERE tenant_id = %(tenant_id)s AND id = %(id)s

-- name: upsert_invoice
-- A newer state replaces an older one, but `paid` and `payment_failed` only ever turn on.
INSERT INTO tollhouse.invoices
    (tenant_id, id, customer_id, subscription_id, status, plan, amount_due, amount_paid,
     currency, period_start, period_end, paid, payment_failed, hosted_invoice_url, raw_data,
     stripe_at)
VALUES (%(tenant_id)s, %(id)s, %(customer_id)s, %(subscription_id)s, %(status)s, %(plan)s,
        %(amount_due)s, %(amount_paid)s, %(currency)s, %(period_start)s, %(period_end)s,
        %(paid)s, %(payment_failed)s, %(url)s, %(raw)s, %(at)s)
ON CONFLICT (tenant_id, id) DO UPDATE
SET status = CASE WHEN excluded.stripe_at > invoices.stripe_at
                  THEN excluded.status ELSE invoices.status END,
    amount_paid = greatest(excluded.amount_paid, invoices.amount_paid),
    plan = coalesce(invoices.plan, excluded.plan),
    period_start = coalesce(invoices.period_start, excluded.period_start),
    period_end = coalesce(invoices.period_end, excluded.period_end),
    paid = invoices.paid OR excluded.paid,
    payment_failed = invoices.payment_failed OR excluded.payment_failed,
    raw_data = CASE WHEN excluded.stripe_at > invoices.stripe_at
                    THEN excluded.raw_data ELSE invoices.raw_data END,
    stripe_at = greatest(excluded.stripe_at, invoices.stripe_at), updated_at = now()

-- name: invoice_allowance
SELECT credits, replayed FROM tollhouse.billing_invoice_allowance_v1(%(tenant_id)s, %(id)s)

-- name: credit_pack
SELECT grant_id, replayed FROM tollhouse.billing_credit_pack_v1(
    %(tenant_id)s, %(session)s, %(price_id)s, %(payment_intent)s, %(credits)s, %(amount)s)

-- name: lifetime_purchase
INSERT INTO tollhouse.lifetime_purchases
    (tenant_id, id, price_id, plan, payment_intent, amount, currency)
VALUES (%(tenant_id)s, %(id)s, %(price_id)s, %(plan)s, %(payment_intent)s, %(amount)s,
        %(currency)s)
ON CONFLICT (tenant_id, id) DO NOTHING

-- name: purchases_by_payment
SELECT 'pack' AS kind, tenant_id, id, amount FROM tollhouse.credit_pack_purchases
WHERE payment_intent = %(payment_intent)s
UNION ALL
SELECT 'lifetime', tenant_id, id, amount FROM tollhouse.lifetime_purchases
WHERE payment_intent = %(payment_intent)s

-- name: earlier_refund
-- The largest refunded total Stripe has told of for a payment (refund events carry totals).
SELECT payload #> '{data,object}' FROM tollhouse.billing_events
WHERE type = 'charge.refunded'
  AND payload #>> '{data,object,payment_intent}' = %(payment_intent)s
ORDER BY (payload #>> '{data,object,amount_refunded}')::bigint DESC
LIMIT 1

-- name: refund_pack
SELECT taken_back, unrecovered FROM tollhouse.billing_refund_pack_v1(
    %(tenant_id)s, %(id)s, %(refunded)s)

-- name: refund_lifetime
UPDATE tollhouse.lifetime_purchases SET refunded_at = coalesce(refunded_at, now())
WHERE tenant_id = %(tenant_id)s AND id = %(id)s

-- name: sync_plan
-- Moves the tenant's credit account to its effective plan (nothing when it is there already).
SELECT plan, changed FROM tollhouse.credit_change_plan_v1(
    %(tenant_id)s, NULL, tollhouse.billing_effective_plan_v1(%(tenant_id)s))

-- name: personal_tenant
SELECT tollhouse.credit_personal_tenant_v1(%(user_id)s)

-- name: customer_of_tenant
SELECT customer_id FROM tollhouse.billing_customers
WHERE tenant_id = %(tenant_id)s AND provider = 'stripe' AND NOT deleted
ORDER BY created_at DESC LIMIT 1

-- name: summary
SELECT tollhouse.billing_effective_plan_v1(%(tenant_id)s) AS plan,
       (SELECT customer_id FROM tollhouse.billing_customers c
        WHERE c.tenant_id = %(tenant_id)s AND NOT c.deleted
        ORDER BY c.created_at DESC LIMIT 1) AS customer_id,
       (SELECT json_build_object(
            'id', s.id, 'status', s.status, 'plan', s.plan,
            'current_period_start', s.current_period_start,
            'current_period_end', s.current_period_end,
            'cancel_at_period_end', s.cancel_at_period_end)
        FROM tollhouse.subscriptions s WHERE s.tenant_id = %(tenant_id)s
        ORDER BY s.status IN ('active', 'trialing', 'past_due') DESC,
                 s.current_period_end DESC NULLS LAST, s.stripe_at DESC
        LIMIT 1) AS subscription,
       (SELECT json_build_object('id', l.id, 'plan', l.plan, 'price_id', l.price_id,
                                 'created_at', l.created_at)
        FROM tollhouse.lifetime_purchases l
        WHERE l.tenant_id = %(tenant_id)s AND l.refunded_at IS NULL
        ORDER BY l.created_at LIMIT 1) AS lifetime,
       coalesce((SELECT json_agg(json_build_object(
                    'id', i.id, 'status', i.status, 'plan', i.plan, 'amount_due', i.amount_due,
                    'amount_paid', i.amount_paid, 'currency', i.currency,
                    'period_start', i.period_start, 'period_end', i.period_end,
                    'paid', i.paid, 'allowance_credits', i.allowance_credits)
                    ORDER BY i.period_start DESC NULLS LAST, i.id)
                 FROM tollhouse.invoices i WHERE i.tenant_id = %(tenant_id)s), '[]') AS invoices
