-- The legacy users.csv import (tollhouse.imports). Phase 1 stages and classifies the whole
-- file in one transaction (temporary tables, then the run's rows); phase 2 applies the
-- staged records in batches, each batch one transaction that also moves the checkpoint.

-- name: plans
SELECT name FROM tollhouse.plans ORDER BY name

-- name: open_run
SELECT id FROM tollhouse.import_runs
WHERE file_sha256 = %(file_sha256)s AND options_sha256 = %(options_sha256)s
  AND status = 'applying'

-- name: lock_run
SELECT pg_try_advisory_lock(hashtextextended('tollhouse.import:' || %(run_id)s::text, 0))

-- name: unlock_run
SELECT pg_advisory_unlock(hashtextextended('tollhouse.import:' || %(run_id)s::text, 0))

-- name: staging_memory
-- Room for the classification's sorts, for this transaction only.
SELECT set_config('work_mem', '256MB', true)

-- name: create_incoming
-- Records and issues arrive by COPY here (COPY cannot write into a table under RLS).
CREATE TEMPORARY TABLE import_incoming (
    record_no integer NOT NULL,
    line_no integer NOT NULL,
    user_id uuid NOT NULL,
    email text NOT NULL,
    provider text NOT NULL,
    subject text,
    display_name text,
    created_at timestamptz,
    last_seen_at timestamptz,
    legacy_tier text NOT NULL,
    plan text NOT NULL,
    plan_override text,
    credits_total bigint,
    credits_remaining bigint,
    credits_balance bigint NOT NULL,
    daily_cap bigint,
    last_daily_reset timestamptz,
    period_end timestamptz,
    marketing boolean NOT NULL,
    status text NOT NULL,
    stripe_customer_id text,
    stripe_subscription_id text,
    billing_status text
) ON COMMIT DROP

-- name: create_incoming_issues
CREATE TEMPORARY TABLE import_incoming_issues (
    record_no integer NOT NULL,
    seq integer NOT NULL,
    line_no integer NOT NULL,
    severity text NOT NULL,
    column_name text NOT NULL,
    value text NOT NULL,
    code text NOT NULL,
    message text NOT NULL
) ON COMMIT DROP

-- name: copy_incoming
COPY import_incoming (
    record_no, line_no, user_id, email, provider, subject, display_name, created_at,
    last_seen_at, legacy_tier, plan, plan_override, credits_total, credits_remaining,
    credits_balance, daily_cap, last_daily_reset, period_end, marketing, status,
    stripe_customer_id, stripe_subscription_id, billing_status
) FROM STDIN

-- name: copy_incoming_issues
COPY import_incoming_issues (record_no, seq, line_no, severity, column_name, value, code, message)
FROM STDIN

-- name: analyze_incoming
-- Row counts for the planner: without them it nests loops over the whole file.
ANALYZE import_incoming

-- name: create_run
INSERT INTO tollhouse.import_runs
    (id, file_sha256, options_sha256, file_name, options, records, counts)
VALUES (%(id)s, %(file_sha256)s, %(options_sha256)s, %(file_name)s, %(options)s, %(records)s,
        '{}')

-- name: classify
-- Every valid record's outcome, decided once for the whole file against the database as it
-- is now: a repeated user_id fails; records sharing an e-mail merge into the first one; the
-- first one is created, updated, unchanged, or skipped when its id, e-mail or identity
-- belongs to a user this import did not create.
CREATE TEMPORARY TABLE import_classified ON COMMIT DROP AS
WITH ranked AS (
    SELECT i.*,
           md5(row(i.email, i.provider, i.subject, i.display_name, i.created_at,
                   i.last_seen_at, i.legacy_tier, i.plan, i.plan_override, i.credits_total,
                   i.credits_balance, i.daily_cap, i.last_daily_reset, i.period_end,
                   i.marketing, i.status, i.stripe_customer_id, i.stripe_subscription_id,
                   i.billing_status)::text) AS fingerprint,
           min(i.record_no) OVER (PARTITION BY i.user_id) AS id_first
    FROM import_incoming i
), unique_ids AS (
    SELECT r.*,
           min(r.record_no) OVER (PARTITION BY r.email) AS email_first,
           CASE WHEN r.subject IS NOT NULL
                THEN min(r.record_no) OVER (PARTITION BY r.provider, r.subject) END
               AS identity_first,
           first_value(r.email) OVER (PARTITION BY r.provider, r.subject ORDER BY r.record_no)
               AS identity_first_email
    FROM ranked r
    WHERE r.record_no = r.id_first
), firsts AS (
    SELECT f.record_no,
           CASE
               WHEN f.identity_first <> f.record_no AND f.identity_first_email <> f.email
                   THEN 'failed:duplicate_provider_user_id'
               WHEN u.id IS NOT NULL AND iu.user_id IS NULL THEN 'skipped:existing_user'
               WHEN u.id IS NOT NULL AND iu.fingerprint = f.fingerprint THEN 'unchanged'
               WHEN u.id IS NOT NULL THEN 'updated'
               WHEN er.user_id IS NOT NULL THEN 'skipped:existing_user'
               WHEN ir.user_id IS NOT NULL THEN 'skipped:existing_identity'
               ELSE 'created'
           END AS outcome,
           iu.credits_balance_before
    FROM unique_ids f
    LEFT JOIN tollhouse.users u ON u.id = f.user_id
    LEFT JOIN (SELECT user_id, fingerprint, opening_balance AS credits_balance_before
               FROM tollhouse.import_users) iu ON iu.user_id = f.user_id
    LEFT JOIN tollhouse.email_routes er ON er.email = f.email
    LEFT JOIN tollhouse.identity_routes ir
        ON ir.provider = f.provider AND ir.subject = f.subject
    WHERE f.record_no = f.email_first
)
SELECT r.record_no, r.line_no, r.user_id, r.email, r.provider, r.subject, r.display_name,
       r.created_at, r.last_seen_at, r.legacy_tier, r.plan, r.plan_override, r.credits_total,
       r.credits_balance, r.daily_cap, r.last_daily_reset, r.period_end, r.marketing,
       r.status, r.stripe_customer_id, r.stripe_subscription_id, r.billing_status,
       r.fingerprint, r.id_first, uid.email_first,
       p.user_id AS target_user_id,
       CASE
           WHEN r.record_no <> r.id_first THEN 'failed:duplicate_user_id'
           WHEN r.record_no = uid.email_first THEN f.outcome
           WHEN f.outcome IN ('created', 'updated', 'unchanged') THEN 'merged'
           ELSE 'skipped:duplicate'
       END AS outcome,
       -- A later record's Google or Apple id joins the first record's user (that provider
       -- verified the address); an e-mail-provider duplicate brings nothing.
       (r.record_no <> uid.email_first AND r.record_no = r.id_first
        AND r.provider IN ('google', 'apple') AND r.subject IS NOT NULL
        AND f.outcome IN ('created', 'updated', 'unchanged')
        AND r.record_no = uid.identity_first
        AND NOT (r.provider = p.provider AND r.subject IS NOT DISTINCT FROM p.subject)
        AND NOT EXISTS (SELECT 1 FROM tollhouse.identity_routes ir
                        WHERE ir.provider = r.provider AND ir.subject = r.subject))
           AS link_identity,
       (SELECT ir.user_id FROM tollhouse.identity_routes ir
        WHERE ir.provider = r.provider AND ir.subject = r.subject) AS identity_owner,
       f.credits_balance_before,
       r.credits_remaining
FROM ranked r
LEFT JOIN unique_ids uid ON uid.record_no = r.record_no
LEFT JOIN unique_ids p ON p.record_no = uid.email_first
LEFT JOIN firsts f ON f.record_no = uid.email_first

-- name: classify_billing
-- A Stripe customer goes to one tenant: the one it is routed to already, else the user of
-- the first record naming it. Only the records that write billing rows are looked at.
CREATE TEMPORARY TABLE import_billing ON COMMIT DROP AS
SELECT c.record_no, x.customer_tenant,
       min(c.record_no) OVER (PARTITION BY c.stripe_customer_id) AS customer_first,
       CASE WHEN x.customer_tenant IS NULL
            THEN min(c.record_no) OVER (PARTITION BY c.stripe_customer_id) = c.record_no
            ELSE x.customer_tenant IS NOT DISTINCT FROM x.user_tenant
       END AS customer_owner
FROM import_classified c
CROSS JOIN LATERAL (
    SELECT (SELECT t.id FROM tollhouse.tenants t
            WHERE c.outcome = 'updated' AND t.owner_user_id = c.user_id AND t.is_default)
               AS user_tenant,
           (SELECT cr.tenant_id FROM tollhouse.billing_customer_routes cr
            WHERE cr.provider = 'stripe' AND cr.customer_id = c.stripe_customer_id)
               AS customer_tenant
) x
WHERE c.outcome IN ('created', 'updated') AND c.stripe_customer_id IS NOT NULL

-- name: stage
-- The records that change something, numbered in the order they are applied (users by
-- user_id, then merged identities: see migration 0010), with the personal tenant of each
-- user: a new id for a new user (ascending with the order), the existing one otherwise.
INSERT INTO tollhouse.import_staging
    (run_id, apply_no, record_no, outcome, user_id, target_user_id, tenant_id, email,
     provider, subject, link_identity, display_name, created_at, last_seen_at, status,
     marketing, legacy_tier, plan, plan_override, credits_total, credits_balance, daily_cap,
     last_daily_reset, period_end, stripe_customer_id, stripe_subscription_id,
     billing_status, fingerprint, customer_owner)
SELECT %(run_id)s, c.apply_no, c.record_no, c.outcome, c.user_id, c.target_user_id,
       CASE WHEN c.outcome = 'created' THEN tollhouse.uuid7_seq(b.base, c.apply_no)
            WHEN c.outcome = 'updated'
            THEN (SELECT t.id FROM tollhouse.tenants t
                  WHERE t.owner_user_id = c.user_id AND t.is_default) END,
       c.email, c.provider, c.subject, c.link_identity, c.display_name, c.created_at,
       c.last_seen_at, c.status, c.marketing, c.legacy_tier, c.plan, c.plan_override,
       c.credits_total, c.credits_balance, c.daily_cap, c.last_daily_reset, c.period_end,
       c.stripe_customer_id, c.stripe_subscription_id, c.billing_status, c.fingerprint,
       coalesce(cb.customer_owner, true)
FROM (SELECT *, row_number() OVER (ORDER BY outcome = 'merged', user_id) AS apply_no
      FROM import_classified
      WHERE outcome IN ('created', 'updated') OR (outcome = 'merged' AND link_identity)) c
LEFT JOIN import_billing cb ON cb.record_no = c.record_no
CROSS JOIN (SELECT tollhouse.uuid7() AS base) b
ORDER BY c.apply_no

-- name: record_issues
-- The report of the run: the parser's and validator's issues, then the classification's.
-- Shown values follow report.shown(): e-mails masked, at most 64 characters.
INSERT INTO tollhouse.import_issues
    (run_id, record_no, seq, line_no, severity, column_name, value, code, message)
SELECT %(run_id)s, record_no, seq, line_no, severity, column_name, value, code, message
FROM import_incoming_issues
UNION ALL
SELECT %(run_id)s, c.record_no, 1000, c.line_no, x.severity, x.column_name,
       CASE WHEN char_length(x.value) > 64 THEN left(x.value, 63) || '…' ELSE x.value END,
       x.code, x.message
FROM import_classified c
LEFT JOIN import_billing cb ON cb.record_no = c.record_no
CROSS JOIN LATERAL (
    SELECT 'error' AS severity, 'user_id' AS column_name, c.user_id::text AS value,
           'duplicate_user_id' AS code,
           'user_id already on record ' || c.id_first || '; record not imported' AS message
    WHERE c.outcome = 'failed:duplicate_user_id'
    UNION ALL
    SELECT 'error', 'provider_user_id', c.subject, 'duplicate_provider_user_id',
           'this ' || c.provider || ' id belongs to an earlier record with another e-mail'
    WHERE c.outcome = 'failed:duplicate_provider_user_id'
    UNION ALL
    SELECT 'info', 'email', regexp_replace(c.email, '^(.)[^@]*@', '\1***@'), 'existing_user',
           'skipped: this user_id or e-mail belongs to a user this import did not create'
    WHERE c.outcome = 'skipped:existing_user'
    UNION ALL
    SELECT 'info', 'provider_user_id', c.subject, 'existing_identity',
           'skipped: this ' || c.provider || ' id belongs to a user this import did not create'
    WHERE c.outcome = 'skipped:existing_identity'
    UNION ALL
    SELECT 'info', 'email', regexp_replace(c.email, '^(.)[^@]*@', '\1***@'),
           'duplicate_of_record:' || c.email_first,
           CASE
               WHEN c.outcome = 'skipped:duplicate'
                   THEN 'skipped: record ' || c.email_first || ' was not imported'
               WHEN c.link_identity
                   THEN 'merged into the user of record ' || c.email_first || '; its '
                        || c.provider || ' id is linked to that user'
               WHEN c.provider = 'email'
                   THEN 'merged into the user of record ' || c.email_first
                        || '; an e-mail-provider duplicate brings nothing'
               WHEN c.identity_owner = c.target_user_id
                   THEN 'merged into the user of record ' || c.email_first || '; its '
                        || c.provider || ' id is linked to that user already'
               ELSE 'merged into the user of record ' || c.email_first || '; its '
                    || c.provider || ' id belongs to another user and is not linked'
           END
    WHERE c.outcome IN ('merged', 'skipped:duplicate')
    UNION ALL
    SELECT 'warning', 'credits_balance', c.credits_balance::text, 'balance_not_reimported',
           'the opening balance ' || c.credits_balance_before || ' was imported before and'
           || ' is not changed by a rerun; use a credits grant or debit'
    WHERE c.outcome IN ('updated', 'unchanged') AND c.record_no = c.email_first
      AND c.credits_balance <> c.credits_balance_before
    UNION ALL
    SELECT 'warning', 'stripe_customer_id', c.stripe_customer_id, 'customer_linked_elsewhere',
           CASE WHEN cb.customer_tenant IS NULL
                THEN 'this Stripe customer is named by record ' || cb.customer_first
                ELSE 'this Stripe customer belongs to another account'
           END || ': its customer and subscription are not written for this user'
    WHERE NOT cb.customer_owner
) x

-- name: counts
SELECT count(*) FILTER (WHERE outcome = 'created') AS created,
       count(*) FILTER (WHERE outcome = 'updated') AS updated,
       count(*) FILTER (WHERE outcome = 'unchanged') AS unchanged,
       count(*) FILTER (WHERE outcome = 'merged') AS merged,
       count(*) FILTER (WHERE outcome LIKE 'skipped:%%') AS skipped,
       count(*) FILTER (WHERE outcome LIKE 'failed:%%') AS failed,
       count(*) FILTER (WHERE outcome = 'merged' AND link_identity) AS identities_linked
FROM import_classified

-- name: set_counts
UPDATE tollhouse.import_runs
SET counts = %(counts)s,
    staged = (SELECT count(*) FROM tollhouse.import_staging WHERE run_id = %(run_id)s)
WHERE id = %(run_id)s

-- name: run
SELECT records, staged, counts,
       (SELECT count(*) FROM tollhouse.import_staging s WHERE s.run_id = r.id) AS remaining
FROM tollhouse.import_runs r WHERE id = %(run_id)s

-- name: batches
-- The work left, cut into batches of `batch_size` users to create or update: ranges
-- (after, through] of apply_no. Merged identities come last, in one batch of their own,
-- once every user they join exists.
SELECT min(apply_no) - 1, max(apply_no), count(*)
FROM (SELECT apply_no,
             (row_number() OVER (ORDER BY apply_no) - 1) / %(batch_size)s AS batch
      FROM tollhouse.import_staging
      WHERE run_id = %(run_id)s AND outcome IN ('created', 'updated')) b
GROUP BY batch
ORDER BY batch

-- name: merges_left
SELECT count(*) FROM tollhouse.import_staging WHERE run_id = %(run_id)s AND outcome = 'merged'

-- name: apply_created
-- New users: exactly the rows identity.create_user writes (user, primary e-mail and its
-- route, preferences, role, personal tenant and membership), plus the identity of the record
-- and the import's provenance row. E-mails are unverified (RELIABILITY 7.2 rule 6).
WITH s AS (
    SELECT * FROM tollhouse.import_staging
    WHERE run_id = %(run_id)s AND apply_no > %(after)s AND apply_no <= %(through)s
      AND outcome = 'created'
), u AS (
    INSERT INTO tollhouse.users (id, display_name, status, plan_override, created_at,
                                 last_seen_at)
    SELECT user_id, display_name, status, plan_override, coalesce(created_at, now()),
           last_seen_at
    FROM s
), route AS (
    INSERT INTO tollhouse.email_routes (email, user_id) SELECT email, user_id FROM s
), email AS (
    INSERT INTO tollhouse.user_emails (user_id, email, is_primary, verified, via)
    SELECT user_id, email, true, false, 'import' FROM s
), prefs AS (
    INSERT INTO tollhouse.user_email_preferences (user_id, marketing)
    SELECT user_id, marketing FROM s
), role AS (
    INSERT INTO tollhouse.user_roles (user_id, role) SELECT user_id, 'user' FROM s
), tenant AS (
    INSERT INTO tollhouse.tenants (id, name, owner_user_id, is_default)
    SELECT tenant_id, 'Personal', user_id, true FROM s
), member AS (
    INSERT INTO tollhouse.tenant_members (tenant_id, user_id, role)
    SELECT tenant_id, user_id, 'owner' FROM s
), ident AS (
    INSERT INTO tollhouse.user_identities (user_id, provider, subject, email)
    SELECT user_id, provider, subject, email FROM s WHERE subject IS NOT NULL
), ident_route AS (
    INSERT INTO tollhouse.identity_routes (provider, subject, user_id)
    SELECT provider, subject, user_id FROM s WHERE subject IS NOT NULL
), provenance AS (
    INSERT INTO tollhouse.import_users
        (user_id, run_id, record_no, fingerprint, legacy_tier, plan, credits_total,
         opening_balance, stripe_customer_id, stripe_subscription_id, billing_status)
    SELECT user_id, run_id, record_no, fingerprint, legacy_tier, plan, credits_total,
           credits_balance, stripe_customer_id, stripe_subscription_id, billing_status
    FROM s
)
SELECT count(*) FROM s

-- name: apply_accounts
-- The new users' credit accounts with their opening balances (one `import` grant and
-- ledger row per user), through the credits function made for it.
SELECT tollhouse.credit_import_accounts_v1(
    array_agg(tenant_id ORDER BY apply_no), array_agg(user_id ORDER BY apply_no),
    array_agg(plan ORDER BY apply_no), array_agg(credits_balance ORDER BY apply_no),
    array_agg(daily_cap ORDER BY apply_no), array_agg(last_daily_reset ORDER BY apply_no),
    array_agg(period_end ORDER BY apply_no),
    array_agg(jsonb_build_object('import_run', run_id, 'record_no', record_no,
                                 'legacy_tier', legacy_tier, 'credits_total', credits_total)
              ORDER BY apply_no),
    %(after)s::bigint * 1048576)
FROM tollhouse.import_staging
WHERE run_id = %(run_id)s AND apply_no > %(after)s AND apply_no <= %(through)s
  AND outcome = 'created'

-- name: apply_merged_identities
-- Google / Apple ids of later records with the same e-mail, linked to the first's user.
WITH s AS (
    SELECT * FROM tollhouse.import_staging
    WHERE run_id = %(run_id)s AND apply_no > %(after)s AND apply_no <= %(through)s
      AND outcome = 'merged' AND link_identity
), ident AS (
    INSERT INTO tollhouse.user_identities (user_id, provider, subject, email)
    SELECT target_user_id, provider, subject, email FROM s
)
INSERT INTO tollhouse.identity_routes (provider, subject, user_id)
SELECT provider, subject, target_user_id FROM s

-- name: apply_updated
-- Users this import created before, whose record changed: the profile, status, plan
-- override and marketing preference follow the file; the opening balance does not.
WITH s AS (
    SELECT * FROM tollhouse.import_staging
    WHERE run_id = %(run_id)s AND apply_no > %(after)s AND apply_no <= %(through)s
      AND outcome = 'updated'
), u AS (
    UPDATE tollhouse.users t
    SET display_name = s.display_name, status = s.status, plan_override = s.plan_override,
        last_seen_at = s.last_seen_at, updated_at = now()
    FROM s WHERE t.id = s.user_id
), prefs AS (
    UPDATE tollhouse.user_email_preferences p
    SET marketing = s.marketing, updated_at = now()
    FROM s WHERE p.user_id = s.user_id
)
UPDATE tollhouse.import_users iu
SET fingerprint = s.fingerprint, legacy_tier = s.legacy_tier, plan = s.plan,
    credits_total = s.credits_total, stripe_customer_id = s.stripe_customer_id,
    stripe_subscription_id = s.stripe_subscription_id, billing_status = s.billing_status,
    updated_at = now()
FROM s WHERE iu.user_id = s.user_id

-- name: apply_updated_plans
-- An updated record's plan moves its account like any plan change (usage kept).
SELECT count(*) FROM (
    SELECT tollhouse.credit_change_plan_v1(NULL, s.user_id, s.plan)
    FROM tollhouse.import_staging s
    JOIN tollhouse.tenants t ON t.owner_user_id = s.user_id AND t.is_default
    JOIN tollhouse.credit_accounts a ON a.tenant_id = t.id
    WHERE s.run_id = %(run_id)s AND s.apply_no > %(after)s AND s.apply_no <= %(through)s
      AND s.outcome = 'updated' AND a.plan <> s.plan
    ORDER BY t.id
) changed

-- name: billing_routes
-- The billing step of a batch (after the users and accounts), for the records staging made
-- owners of their Stripe customer (customer_owner; the others are reported as
-- customer_linked_elsewhere). tenant_id is the user's personal tenant. A customer routed
-- elsewhere since staging keeps its tenant and the record's billing rows are not written.
INSERT INTO tollhouse.billing_customer_routes (customer_id, tenant_id)
SELECT s.stripe_customer_id, s.tenant_id
FROM tollhouse.import_staging s
WHERE s.run_id = %(run_id)s AND s.apply_no > %(after)s AND s.apply_no <= %(through)s
  AND s.outcome IN ('created', 'updated') AND s.stripe_customer_id IS NOT NULL
  AND s.customer_owner
ORDER BY s.stripe_customer_id
ON CONFLICT (provider, customer_id) DO NOTHING

-- name: billing_customers
INSERT INTO tollhouse.billing_customers (tenant_id, customer_id, email)
SELECT s.tenant_id, s.stripe_customer_id, s.email
FROM tollhouse.import_staging s
JOIN tollhouse.billing_customer_routes r
  ON r.provider = 'stripe' AND r.customer_id = s.stripe_customer_id
  AND r.tenant_id = s.tenant_id
WHERE s.run_id = %(run_id)s AND s.apply_no > %(after)s AND s.apply_no <= %(through)s
  AND s.outcome IN ('created', 'updated') AND s.stripe_customer_id IS NOT NULL
  AND s.customer_owner
ON CONFLICT (tenant_id, provider, customer_id) DO NOTHING

-- name: billing_subscriptions
-- Stamped at the Unix epoch: any real Stripe event about the subscription is newer and wins.
-- (credit_change_plan_v1 below is what moves the accounts.)
INSERT INTO tollhouse.subscriptions
    (tenant_id, id, customer_id, status, plan, current_period_end, metadata, stripe_at)
SELECT s.tenant_id, s.stripe_subscription_id, s.stripe_customer_id, s.billing_status, s.plan,
       s.period_end, jsonb_build_object('source', 'legacy_import', 'legacy_tier', s.legacy_tier),
       timestamptz 'epoch'
FROM tollhouse.import_staging s
JOIN tollhouse.billing_customer_routes r
  ON r.provider = 'stripe' AND r.customer_id = s.stripe_customer_id
  AND r.tenant_id = s.tenant_id
WHERE s.run_id = %(run_id)s AND s.apply_no > %(after)s AND s.apply_no <= %(through)s
  AND s.outcome IN ('created', 'updated') AND s.stripe_subscription_id IS NOT NULL
  AND s.customer_owner
ON CONFLICT (tenant_id, id) DO UPDATE
SET status = excluded.status, plan = excluded.plan,
    current_period_end = excluded.current_period_end, updated_at = now()
-- A changed record moves an imported state, never one a Stripe event has brought since.
WHERE subscriptions.stripe_at = timestamptz 'epoch'
  AND (subscriptions.status, subscriptions.plan, subscriptions.current_period_end)
      IS DISTINCT FROM (excluded.status, excluded.plan, excluded.current_period_end)

-- name: billing_plans
-- The accounts of the batch's subscribers follow their effective plan (a canceled legacy
-- subscription leaves the free plan).
SELECT count(*) FILTER (WHERE c.changed)
FROM (SELECT DISTINCT s.tenant_id
      FROM tollhouse.import_staging s
      WHERE s.run_id = %(run_id)s AND s.apply_no > %(after)s AND s.apply_no <= %(through)s
        AND s.outcome IN ('created', 'updated') AND s.stripe_subscription_id IS NOT NULL
      ORDER BY s.tenant_id) b,
     LATERAL tollhouse.credit_change_plan_v1(
         b.tenant_id, NULL, tollhouse.billing_effective_plan_v1(b.tenant_id)) c

-- name: batch_done
-- The checkpoint: what a batch applied leaves the staging table with its commit. Zero rows
-- means another process applied it already (the batch then rolls back).
DELETE FROM tollhouse.import_staging
WHERE run_id = %(run_id)s AND apply_no > %(after)s AND apply_no <= %(through)s
  AND outcome = ANY(%(outcomes)s)

-- name: finish_run
UPDATE tollhouse.import_runs SET status = 'done', finished_at = now()
WHERE id = %(run_id)s AND status = 'applying'
  AND NOT EXISTS (SELECT 1 FROM tollhouse.import_staging WHERE run_id = %(run_id)s)

-- name: issues
SELECT record_no, line_no, column_name, value, code, message, severity
FROM tollhouse.import_issues
WHERE run_id = %(run_id)s
ORDER BY record_no, seq
