-- Billing (tollhouse.billing). Each synced row is written by one upsert that applies only a
-- newer Stripe state (`stripe_at`); money goes through the functions of migration 0006, the
-- handlers of the frequent events and the receiving of deliveries are those of 0009.

-- name: store_event
-- The raw body, cast: the payload is never serialised again in Python. The event id's lock
-- first, as billing_receive_v1 takes it (a concurrent delivery of the id waits for us).
INSERT INTO tollhouse.billing_events
    (stripe_event_id, type, payload_hash, payload, event_created, customer_id, source)
SELECT %(id)s, %(type)s, %(hash)s, %(payload)s::jsonb, %(created)s, %(customer_id)s, %(source)s
FROM (SELECT pg_advisory_xact_lock(hashtextextended('tollhouse.stripe_event:' || %(id)s, 0))) l
ON CONFLICT (stripe_event_id) DO NOTHING
RETURNING stripe_event_id

-- name: receive
-- A batch of verified deliveries (or events read from the API: source 'api') stored and
-- applied, one row each, in order (migration 0009). `heals`: an invoice that failed
-- because its plan could not be told, or a subscription applied for a customer with such
-- invoices: after the commit, failed_on_subscription finds those that apply now (migration
-- 0019; the function is called for those two kinds of rows only).
SELECT r.stripe_event_id, r.type, r.status, r.error, r.tenant_id, r.customer_id, r.unpark,
       CASE WHEN (r.status = 'failed' AND starts_with(r.type, 'invoice.'))
                 OR (r.status = 'processed' AND starts_with(r.type, 'customer.subscription.'))
            THEN tollhouse.billing_heals_v1(r.type, r.status, r.error, r.customer_id)
            ELSE false END AS heals
FROM tollhouse.billing_receive_v1(%(events)s::jsonb, %(hashes)s, %(customers)s, %(unpark)s,
                                  %(source)s) r

-- name: process
-- A stored event applied by billing_apply_v1 and its outcome recorded.
SELECT status, error, tenant_id, customer_id, unpark
FROM tollhouse.billing_process_v1(%(id)s, %(type)s, %(obj)s, %(at)s, %(customer_id)s)

-- name: apply
SELECT status, tenant_id, customer_id FROM tollhouse.billing_apply_v1(%(type)s, %(obj)s, %(at)s)

-- name: finish_event
-- Whether the customer, now linked, has parked events to apply (one round trip for both).
SELECT tollhouse.billing_finish_event_v1(
    %(id)s, %(status)s, %(error)s, %(tenant_id)s, %(customer_id)s)

-- name: route
-- Takes the customer's lock, held to the end of the transaction (see billing_route_v1).
SELECT tollhouse.billing_route_v1(%(customer_id)s)

-- name: link_customer
SELECT tollhouse.billing_link_v1(%(customer_id)s, %(tenant_id)s)

-- name: tenant_of_reference
SELECT tollhouse.billing_reference_tenant_v1(%(ref)s)

-- name: known_plan
SELECT tollhouse.billing_known_plan_v1(%(plan)s, %(what)s)

-- name: resolve_price
SELECT id, plan, credits, lifetime FROM tollhouse.billing_resolve_price_v1(%(price)s)

-- name: sync_plan
-- Moves the tenant's credit account to its effective plan (nothing when it is there already).
SELECT tollhouse.billing_sync_plan_v1(%(tenant_id)s)

-- name: event_hash
SELECT payload_hash, status, source FROM tollhouse.billing_events
WHERE stripe_event_id = %(id)s

-- name: record_conflict
INSERT INTO tollhouse.billing_event_conflicts (stripe_event_id, payload_hash)
VALUES (%(id)s, %(hash)s)
ON CONFLICT (stripe_event_id, payload_hash) DO UPDATE
SET deliveries = billing_event_conflicts.deliveries + 1, last_at = now()

-- name: lock_event
SELECT stripe_event_id, type, status, payload FROM tollhouse.billing_events
WHERE stripe_event_id = %(id)s FOR UPDATE

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

-- name: failed_on_price
-- The failed events that named this price while it was unknown here or sold nothing (their
-- error begins 'unknown price <id>:'), oldest first; none while it still sells nothing.
SELECT e.stripe_event_id FROM tollhouse.billing_events e
WHERE e.status = 'failed'
  AND starts_with(e.last_error, 'unknown price ' || %(price_id)s || ':')
  AND EXISTS (SELECT 1 FROM tollhouse.billing_prices p
              WHERE p.id = %(price_id)s AND (p.plan IS NOT NULL OR p.credits IS NOT NULL))
ORDER BY e.event_created, e.stripe_event_id

-- name: failed_on_subscription
-- The customer's invoices that failed because their plan could not be told (a price
-- unknown here or selling nothing, their subscription not stored), once their subscription
-- is stored with a plan: read as billing_apply_invoice_v1 reads it (the invoice's, else its
-- parent's, else its subscription line's or first line's) and found by its key (the
-- customer's tenant and its id); oldest first. Locked when run in a transaction (a
-- customer's unparking). A row another transaction holds is skipped: that one (a retry of
-- the invoice, or a receive call failing it) keeps the customer's lock to its commit and
-- looks for the subscription after it, so it sees this one's (a retry made by such a look
-- does not look again: it runs because the subscription is stored).
SELECT e.stripe_event_id, e.type, e.status, e.payload
FROM tollhouse.billing_events e
CROSS JOIN LATERAL (SELECT e.payload -> 'data' -> 'object' AS o) x
WHERE e.status = 'failed' AND e.customer_id = %(customer_id)s
  AND starts_with(e.type, 'invoice.') AND starts_with(e.last_error, 'unknown price ')
  AND EXISTS (
      SELECT 1
      FROM tollhouse.billing_customer_routes r
      JOIN tollhouse.subscriptions s ON s.tenant_id = r.tenant_id
      WHERE r.provider = 'stripe' AND r.customer_id = e.customer_id AND s.plan IS NOT NULL
        AND s.id = coalesce(
            tollhouse.billing_ref_v1(x.o -> 'subscription'),
            tollhouse.billing_ref_v1(x.o -> 'parent' -> 'subscription_details' -> 'subscription'),
            (SELECT tollhouse.billing_ref_v1(l -> 'subscription')
             FROM jsonb_array_elements(
                 CASE WHEN jsonb_typeof(x.o -> 'lines' -> 'data') = 'array'
                      THEN x.o -> 'lines' -> 'data' ELSE '[]' END) WITH ORDINALITY AS y (l, n)
             ORDER BY (l ->> 'type' = 'subscription'
                       OR l -> 'parent' ->> 'type' = 'subscription_item_details') IS TRUE DESC,
                      n
             LIMIT 1)))
ORDER BY e.event_created, e.stripe_event_id
FOR UPDATE OF e SKIP LOCKED

-- name: event
SELECT stripe_event_id, type, status, tenant_id, user_id, customer_id, attempts, last_error,
       event_created, received_at, processed_at
FROM tollhouse.billing_events WHERE stripe_event_id = %(id)s

-- name: price
SELECT id, plan, credits, lifetime, type, active FROM tollhouse.billing_prices
WHERE id = %(id)s

-- name: current_subscription
-- A subscription of the tenant that makes its plan now (as billing_effective_plan_v1 counts).
SELECT id FROM tollhouse.subscriptions
WHERE tenant_id = %(tenant_id)s AND status IN ('active', 'trialing', 'past_due')
ORDER BY current_period_end DESC NULLS LAST LIMIT 1

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

-- name: lock_payment
SELECT pg_advisory_xact_lock(hashtextextended('tollhouse.stripe_payment:' || %(payment_intent)s, 0))

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

-- name: personal_tenant
SELECT tollhouse.credit_personal_tenant_v1(%(user_id)s)

-- name: customer_of_tenant
-- The tenant's live customer (or NULL), and how many of its customers were deleted.
SELECT (SELECT c.customer_id FROM tollhouse.billing_customers c
        WHERE c.tenant_id = %(tenant_id)s AND c.provider = 'stripe' AND NOT c.deleted
        ORDER BY c.created_at DESC LIMIT 1),
       (SELECT count(*) FROM tollhouse.billing_customers c
        WHERE c.tenant_id = %(tenant_id)s AND c.provider = 'stripe' AND c.deleted)

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
        LEFT JOIN tollhouse.plans p ON p.name = l.plan
        WHERE l.tenant_id = %(tenant_id)s AND l.refunded_at IS NULL
        -- The deal billing_plan_v1 takes the plan from: the richest, then the oldest.
        ORDER BY p.monthly_credits DESC NULLS LAST, l.created_at LIMIT 1) AS lifetime,
       coalesce((SELECT json_agg(json_build_object(
                    'id', i.id, 'status', i.status, 'plan', i.plan, 'amount_due', i.amount_due,
                    'amount_paid', i.amount_paid, 'currency', i.currency,
                    'period_start', i.period_start, 'period_end', i.period_end,
                    'paid', i.paid, 'allowance_credits', i.allowance_credits)
                    ORDER BY i.period_start DESC NULLS LAST, i.id)
                 FROM tollhouse.invoices i WHERE i.tenant_id = %(tenant_id)s), '[]') AS invoices
