-- Credits (tollhouse.credits). Money changes are single calls to the functions of
-- migration 0004; these are the reads around them.

-- name: debit
SELECT * FROM tollhouse.credit_debit_v1(
    %(tenant_id)s, %(user_id)s, %(amount)s, %(turn_id)s, %(session_id)s, %(reason)s,
    %(metadata)s)

-- name: debit_batch
SELECT * FROM tollhouse.credit_debit_batch_v1(
    %(tenant_ids)s::uuid[], %(user_ids)s::uuid[], %(amounts)s::bigint[], %(turn_ids)s::text[],
    %(session_ids)s::text[], %(reasons)s::text[], %(metadata)s::jsonb[])

-- name: grant
SELECT * FROM tollhouse.credit_grant_v1(
    %(tenant_id)s, %(user_id)s, %(amount)s, %(source)s, %(source_id)s, %(priority)s,
    %(expires_at)s)

-- name: resolve_tenant
-- The tenant a request names: the tenant itself, or the user's personal tenant.
SELECT t.id
FROM tollhouse.tenants t
LEFT JOIN tollhouse.users u ON u.id = t.owner_user_id
WHERE t.deleted_at IS NULL
  AND ((%(tenant_id)s::uuid IS NOT NULL AND t.id = %(tenant_id)s::uuid)
       OR (%(tenant_id)s::uuid IS NULL AND t.owner_user_id = %(user_id)s AND t.is_default
           AND u.deleted_at IS NULL))

-- name: account_fresh
-- Whether the account can be read as it is: it exists, its period has not ended, no live
-- grant or pending hold has expired and this period's allowance was granted.
SELECT a.period_end > now()
       AND a.allowance_for IS NOT DISTINCT FROM a.period_start
       AND NOT EXISTS (SELECT 1 FROM tollhouse.credit_grants g
                       WHERE g.tenant_id = a.tenant_id AND g.remaining > 0
                         AND g.expires_at <= now())
       AND NOT EXISTS (SELECT 1 FROM tollhouse.credit_reservations r
                       WHERE r.tenant_id = a.tenant_id AND r.status = 'pending'
                         AND r.expires_at <= now())
FROM tollhouse.credit_accounts a WHERE a.tenant_id = %(tenant_id)s

-- name: refresh_account
SELECT tenant_id FROM tollhouse.credit_account_v1(%(tenant_id)s)

-- name: refresh_accounts
-- Many accounts brought up to date in one transaction, locked in tenant order (the order
-- every batch of debits takes, so the two never wait on each other in a cycle).
SELECT count(a.tenant_id)
FROM (SELECT DISTINCT t FROM unnest(%(tenant_ids)s::uuid[]) AS t ORDER BY t) ids,
     LATERAL tollhouse.credit_account_v1(ids.t) a

-- name: balance
SELECT a.tenant_id, a.balance,
       a.balance - a.reserved + a.overdraft_limit AS available,
       a.plan, a.daily_cap,
       CASE WHEN a.day_start = (now() AT TIME ZONE a.time_zone)::date
            THEN a.daily_used ELSE 0 END AS daily_used,
       greatest(0, -a.balance) AS overdraft, a.overdraft_limit,
       a.period_start, a.period_end, a.time_zone,
       coalesce((SELECT json_agg(json_build_object(
                    'id', g.id, 'source', g.source, 'source_id', g.source_id, 'total', g.total,
                    'remaining', g.remaining, 'priority', g.priority,
                    'expires_at', g.expires_at, 'created_at', g.created_at)
                    ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.created_at, g.id)
                 FROM tollhouse.credit_grants g
                 WHERE g.tenant_id = a.tenant_id AND g.remaining > 0), '[]') AS grants
FROM tollhouse.credit_accounts a
WHERE a.tenant_id = %(tenant_id)s

-- name: ledger
-- Newest first by id (UUIDv7: time-ordered), so a page walks the primary key index.
SELECT id, kind, reason, delta, balance_after, turn_id, session_id, acting_user_id, grant_id,
       metadata, created_at
FROM tollhouse.credit_ledger
WHERE tenant_id = %(tenant_id)s
  AND (%(before_id)s::uuid IS NULL OR id < %(before_id)s::uuid)
ORDER BY id DESC
LIMIT %(limit)s

-- name: plans
SELECT name, monthly_credits, daily_cap, overdraft_limit, updated_at
FROM tollhouse.plans ORDER BY monthly_credits, name

-- name: set_plan
INSERT INTO tollhouse.plans (name, monthly_credits, daily_cap, overdraft_limit)
VALUES (%(name)s, %(monthly_credits)s, %(daily_cap)s, %(overdraft_limit)s)
ON CONFLICT (name) DO UPDATE SET
    monthly_credits = excluded.monthly_credits,
    daily_cap = excluded.daily_cap,
    overdraft_limit = excluded.overdraft_limit,
    updated_at = now()
RETURNING name, monthly_credits, daily_cap, overdraft_limit, updated_at

-- name: conservation
-- Accounts whose cached balance differs from their ledger or from their live grants, or
-- whose reserved amount differs from their pending holds.
SELECT tenant_id, balance, ledger_sum, remaining_sum, reserved, held
FROM (
    SELECT a.tenant_id, a.balance, a.reserved,
           coalesce((SELECT sum(l.delta) FROM tollhouse.credit_ledger l
                     WHERE l.tenant_id = a.tenant_id), 0) AS ledger_sum,
           coalesce((SELECT sum(g.remaining) FROM tollhouse.credit_grants g
                     WHERE g.tenant_id = a.tenant_id), 0) AS remaining_sum,
           coalesce((SELECT sum(r.amount) FROM tollhouse.credit_reservations r
                     WHERE r.tenant_id = a.tenant_id AND r.status = 'pending'), 0) AS held
    FROM tollhouse.credit_accounts a
    WHERE %(tenant_id)s::uuid IS NULL OR a.tenant_id = %(tenant_id)s::uuid
) s
WHERE balance <> ledger_sum OR greatest(balance, 0) <> remaining_sum OR reserved <> held

-- name: reserve
SELECT * FROM tollhouse.credit_reserve_v1(
    %(tenant_id)s, %(user_id)s, %(amount)s, %(turn_id)s, %(ttl)s, %(session_id)s)

-- name: resolve
SELECT * FROM tollhouse.credit_resolve_v1(
    %(tenant_id)s, %(user_id)s, %(turn_id)s, %(amount)s, %(reason)s, %(metadata)s)

-- name: refund
SELECT * FROM tollhouse.credit_refund_v1(%(ledger_id)s, %(total)s, %(user_id)s)

-- name: usage_increment
SELECT * FROM tollhouse.usage_increment_v1(
    %(tenant_id)s, %(metric)s, make_interval(secs => %(window)s), %(amount)s, %(limit)s)

-- name: stale_accounts
-- Accounts an operation would change on its own: period over, grant or hold expired.
SELECT a.tenant_id FROM tollhouse.credit_accounts a
WHERE a.tenant_id > %(after)s
  AND (a.period_end <= now()
   OR EXISTS (SELECT 1 FROM tollhouse.credit_grants g
              WHERE g.tenant_id = a.tenant_id AND g.remaining > 0 AND g.expires_at <= now())
   OR EXISTS (SELECT 1 FROM tollhouse.credit_reservations r
              WHERE r.tenant_id = a.tenant_id AND r.status = 'pending' AND r.expires_at <= now()))
ORDER BY a.tenant_id
LIMIT %(limit)s

-- name: change_plan
SELECT * FROM tollhouse.credit_change_plan_v1(%(tenant_id)s, %(user_id)s, %(plan)s)

-- name: adjust
SELECT * FROM tollhouse.credit_adjust_v1(
    %(tenant_id)s, %(user_id)s, %(amount)s, %(adjustment_id)s, %(note)s)

-- name: time_zone_known
SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = %(time_zone)s)

-- name: set_time_zone
-- After `refresh_account` in the same transaction (one statement cannot update a row a
-- function in it already changed). The day moves to today in the new zone, keeping the
-- usage counted for today in the old one (and the pending holds counted in it): left in the
-- old zone, a day ahead of the new zone's froze the cap until the new zone passed it (the
-- day only moves forward), up to 35 hours.
WITH old AS (
    SELECT tenant_id, day_start, day_start >= (now() AT TIME ZONE time_zone)::date AS today,
           (now() AT TIME ZONE %(time_zone)s)::date AS new_today
    FROM tollhouse.credit_accounts
    WHERE tenant_id = %(tenant_id)s
), holds AS (
    -- Holds counted in today's usage move to the new today; the others (an earlier day's,
    -- not counted) to a day before it, or releasing one would take from today's count what
    -- it never held (a zone behind the old one can make the old yesterday the new today).
    UPDATE tollhouse.credit_reservations r
    SET day = CASE WHEN r.day = old.day_start AND old.today THEN old.new_today
                   ELSE least(r.day, old.new_today - 1) END
    FROM old
    WHERE r.tenant_id = old.tenant_id AND r.status = 'pending'
)
UPDATE tollhouse.credit_accounts a
SET time_zone = %(time_zone)s,
    day_start = CASE WHEN old.day_start IS NOT NULL THEN old.new_today END,
    daily_used = CASE WHEN old.today THEN a.daily_used ELSE 0 END,
    updated_at = now()
FROM old
WHERE a.tenant_id = old.tenant_id

-- name: turn_known
SELECT EXISTS (SELECT 1 FROM tollhouse.credit_turns WHERE turn_id = %(turn_id)s)
