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
-- Room for the classification's sorts and hashes, for this transaction only.
SELECT set_config('work_mem', '256MB', true)

-- name: classify_joins
-- The classification joins every record of the file to users, provenance, e-mail and
-- identity routes. For a file of at least a tenth as many records as there are users, hash
-- joins: one pass over each table instead of an index probe per record and table (on a
-- rerun of 1,000,000 records the probes were most of its time). A smaller file keeps the
-- planner's choice (probes, rather than reading the whole tables). For the rest of the
-- staging transaction.
SELECT set_config('enable_nestloop', 'off', true)
WHERE %(records)s::bigint * 10 >= (SELECT greatest(c.reltuples, 0) FROM pg_class c
                                   WHERE c.oid = 'tollhouse.users'::regclass)

-- name: create_incoming
-- Records and issues arrive by COPY here (COPY cannot write into a table under RLS).
-- email is NULL only for a Google or Apple record without one (the validator's rule).
CREATE TEMPORARY TABLE import_incoming (
    record_no integer NOT NULL,
    line_no integer NOT NULL,
    user_id uuid NOT NULL,
    email text,
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
-- user_id: on the first issue of a failed record whose user_id is a UUID, that id (the
-- record still holds it: a later record with the same id fails as duplicate_user_id).
CREATE TEMPORARY TABLE import_incoming_issues (
    record_no integer NOT NULL,
    seq integer NOT NULL,
    line_no integer NOT NULL,
    severity text NOT NULL,
    column_name text NOT NULL,
    value text NOT NULL,
    code text NOT NULL,
    message text NOT NULL,
    user_id uuid
) ON COMMIT DROP

-- name: copy_incoming
COPY import_incoming (
    record_no, line_no, user_id, email, provider, subject, display_name, created_at,
    last_seen_at, legacy_tier, plan, plan_override, credits_total, credits_remaining,
    credits_balance, daily_cap, last_daily_reset, period_end, marketing, status,
    stripe_customer_id, stripe_subscription_id, billing_status
) FROM STDIN

-- name: copy_incoming_issues
COPY import_incoming_issues
    (record_no, seq, line_no, severity, column_name, value, code, message, user_id)
FROM STDIN

-- name: analyze_incoming
-- Row counts for the planner: without them it nests loops over the whole file.
ANALYZE import_incoming, import_incoming_issues

-- name: create_run
INSERT INTO tollhouse.import_runs
    (id, file_sha256, options_sha256, file_name, options, records, counts)
VALUES (%(id)s, %(file_sha256)s, %(options_sha256)s, %(file_name)s, %(options)s, %(records)s,
        '{}')

-- name: classify
-- Every valid record's outcome, decided once for the whole file against the database as it
-- is now: a repeated user_id fails (the first record of an id may be one that failed: see
-- create_incoming_issues); records sharing an e-mail merge into the first one, and a
-- record without an e-mail into the record holding its Google / Apple id, the first with an
-- e-mail if any (seed 001: the provider id matches when there is no e-mail); that record is
-- created, updated, unchanged, or skipped when its id, e-mail or identity belongs to
-- another user already in the database. The fingerprint hashes the text of the record's
-- timestamps, which follows TimeZone and DateStyle: our connections fix both (UTC, ISO:
-- tollhouse.db.pool.SESSION_SETTINGS), so a rerun under another PGTZ or database setting
-- finds the same fingerprints.
CREATE TEMPORARY TABLE import_classified ON COMMIT DROP AS
WITH ranked AS (
    SELECT i.*,
           md5(row(i.email, i.provider, i.subject, i.display_name, i.created_at,
                   i.last_seen_at, i.legacy_tier, i.plan, i.plan_override, i.credits_total,
                   i.credits_balance, i.daily_cap, i.last_daily_reset, i.period_end,
                   i.marketing, i.status, i.stripe_customer_id, i.stripe_subscription_id,
                   i.billing_status)::text) AS fingerprint,
           least(min(i.record_no) OVER (PARTITION BY i.user_id), fi.record_no) AS id_first,
           ir.user_id AS identity_owner
    FROM import_incoming i
    LEFT JOIN (SELECT user_id, min(record_no) AS record_no FROM import_incoming_issues
               WHERE user_id IS NOT NULL GROUP BY user_id) fi ON fi.user_id = i.user_id
    -- The one lookup of each record's Google / Apple id: who owns it already decides both
    -- a first record's skip (existing_identity) and a later record's link.
    LEFT JOIN tollhouse.identity_routes ir
        ON ir.provider = i.provider AND ir.subject = i.subject
), identities AS (
    -- Only what the outcomes need: these rows are sorted twice (a third of the width).
    SELECT r.record_no, r.user_id, r.email, r.provider, r.subject, r.fingerprint,
           r.identity_owner,
           -- The record that holds a Google / Apple id: the first with an e-mail, else the
           -- first (a record without an e-mail is the same person, in whatever order).
           CASE WHEN r.subject IS NOT NULL
                THEN first_value(r.record_no) OVER holders END AS identity_first,
           first_value(r.email) OVER holders AS identity_first_email
    FROM ranked r
    WHERE r.record_no = r.id_first
    WINDOW holders AS (PARTITION BY r.provider, r.subject ORDER BY r.email IS NULL, r.record_no)
), unique_ids AS (
    -- email_first: the record the merge group is (its first with an e-mail, else its
    -- first). The group is the e-mail; a record without one (always a Google / Apple
    -- record with its id) joins the group of the record holding its id: that record's
    -- e-mail, or else the id itself (written with a space, which no address holds).
    SELECT i.*,
           first_value(i.record_no) OVER (
               PARTITION BY coalesce(i.email, i.identity_first_email,
                                     i.provider || ' ' || i.subject)
               ORDER BY i.email IS NULL, i.record_no) AS email_first
    FROM identities i
), firsts AS (
    SELECT f.record_no,
           CASE
               -- (An earlier holder without an e-mail is another user too.)
               WHEN f.identity_first <> f.record_no
                    AND f.identity_first_email IS DISTINCT FROM f.email
                   THEN 'failed:duplicate_provider_user_id'
               WHEN u.id IS NOT NULL AND iu.user_id IS NULL THEN 'skipped:existing_user'
               WHEN u.id IS NOT NULL AND iu.fingerprint = f.fingerprint THEN 'unchanged'
               WHEN u.id IS NOT NULL THEN 'updated'
               WHEN er.user_id IS NOT NULL THEN 'skipped:existing_user'
               WHEN f.identity_owner IS NOT NULL THEN 'skipped:existing_identity'
               ELSE 'created'
           END AS outcome,
           iu.credits_balance_before
    FROM unique_ids f
    LEFT JOIN tollhouse.users u ON u.id = f.user_id
    LEFT JOIN (SELECT user_id, fingerprint, opening_balance AS credits_balance_before
               FROM tollhouse.import_users) iu ON iu.user_id = f.user_id
    LEFT JOIN tollhouse.email_routes er ON er.email = f.email
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
           -- Without an e-mail, an id another user in the database holds is that user's.
           WHEN r.email IS NULL AND r.identity_owner IS DISTINCT FROM p.user_id
                AND r.identity_owner IS NOT NULL THEN 'skipped:existing_identity'
           -- A duplicate of an unchanged user that has no identity to link brings nothing
           -- this run: unchanged too (RELIABILITY C-11: a rerun finds every record so).
           WHEN f.outcome = 'unchanged' AND NOT l.link_identity THEN 'unchanged'
           WHEN f.outcome IN ('created', 'updated', 'unchanged') THEN 'merged'
           ELSE 'skipped:duplicate'
       END AS outcome,
       l.link_identity,
       r.identity_owner,
       f.credits_balance_before,
       r.credits_remaining
FROM ranked r
LEFT JOIN unique_ids uid ON uid.record_no = r.record_no
LEFT JOIN unique_ids p ON p.record_no = uid.email_first
LEFT JOIN firsts f ON f.record_no = uid.email_first
-- A later record's Google or Apple id joins the first record's user (that provider verified
-- the address); an e-mail-provider duplicate brings nothing.
CROSS JOIN LATERAL (
    SELECT coalesce(r.record_no <> uid.email_first AND r.record_no = r.id_first
                    AND r.provider IN ('google', 'apple') AND r.subject IS NOT NULL
                    AND f.outcome IN ('created', 'updated', 'unchanged')
                    AND r.record_no = uid.identity_first
                    AND NOT (r.provider = p.provider AND r.subject IS NOT DISTINCT FROM p.subject)
                    AND r.identity_owner IS NULL, false) AS link_identity) l

-- name: classify_billing
-- A Stripe customer goes to one tenant: the one it is routed to already, else the user of
-- the first record naming it. Only the records that write billing rows are looked at.
CREATE TEMPORARY TABLE import_billing ON COMMIT DROP AS
SELECT c.record_no, x.customer_tenant,
       min(c.record_no) OVER (PARTITION BY c.stripe_customer_id) AS customer_first,
       CASE WHEN x.customer_tenant IS NULL
            THEN min(c.record_no) OVER (PARTITION BY c.stripe_customer_id) = c.record_no
            ELSE x.customer_tenant IS NOT DISTINCT FROM ut.user_tenant
       END AS customer_owner
FROM import_classified c
-- Joins, not lookups per record (each matches at most one row: one personal tenant per
-- user, one route per customer).
LEFT JOIN (SELECT t.owner_user_id, t.id AS user_tenant FROM tollhouse.tenants t
           WHERE t.is_default) ut
    ON c.outcome = 'updated' AND ut.owner_user_id = c.user_id
LEFT JOIN (SELECT cr.customer_id, cr.tenant_id AS customer_tenant
           FROM tollhouse.billing_customer_routes cr WHERE cr.provider = 'stripe') x
    ON x.customer_id = c.stripe_customer_id
WHERE c.outcome IN ('created', 'updated') AND c.stripe_customer_id IS NOT NULL

-- name: analyze_classified
-- Row counts for the statements that read the classification (a plan made for a handful
-- of rows hashed the whole classification to join the billing owners, then sorted it again).
ANALYZE import_classified, import_billing

-- name: stage
-- The records that change something, numbered in the order they are applied (users by
-- user_id, then merged identities: see migration 0010), with the personal tenant of each
-- user: a new id for a new user (ascending with the order), the existing one otherwise.
-- A record without an e-mail is staged without one (migration 0020): the apply steps write
-- no address for it.
INSERT INTO tollhouse.import_staging
    (run_id, apply_no, record_no, outcome, user_id, target_user_id, tenant_id, email,
     provider, subject, link_identity, display_name, created_at, last_seen_at, status,
     marketing, legacy_tier, plan, plan_override, credits_total, credits_balance, daily_cap,
     last_daily_reset, period_end, stripe_customer_id, stripe_subscription_id,
     billing_status, fingerprint, customer_owner)
SELECT %(run_id)s, c.apply_no, c.record_no, c.outcome, c.user_id, c.target_user_id,
       -- tollhouse.uuid7_seq(b.base, c.apply_no) written out: a call of that function (not
       -- inlined: it sets its search_path) costs several times the expression.
       CASE WHEN c.outcome = 'created'
            THEN encode(overlay(uuid_send(b.base)
                                PLACING int8send(c.apply_no - 9223372036854775807 - 1)
                                FROM 9 FOR 8), 'hex')::uuid
            WHEN c.outcome = 'updated'
            THEN (SELECT t.id FROM tollhouse.tenants t
                  WHERE t.owner_user_id = c.user_id AND t.is_default) END,
       c.email, c.provider, c.subject, c.link_identity, c.display_name,
       c.created_at, c.last_seen_at, c.status, c.marketing, c.legacy_tier, c.plan,
       c.plan_override, c.credits_total, c.credits_balance, c.daily_cap, c.last_daily_reset,
       c.period_end, c.stripe_customer_id, c.stripe_subscription_id, c.billing_status,
       c.fingerprint,
       coalesce(cb.customer_owner, true)
FROM (SELECT *, row_number() OVER (ORDER BY outcome = 'merged', user_id) AS apply_no
      FROM import_classified
      WHERE outcome IN ('created', 'updated') OR (outcome = 'merged' AND link_identity)) c
LEFT JOIN import_billing cb ON cb.record_no = c.record_no
CROSS JOIN (SELECT tollhouse.uuid7() AS base) b
ORDER BY c.apply_no

-- name: record_issues
-- The report of the run: the parser's and validator's issues (seq from 0), then the
-- classification's. A record may have several of these (an update whose balance changed and
-- whose customer is linked elsewhere, say): each code has its own seq from 1000, which keeps
-- the key (run_id, record_no, seq) unique and the report's order fixed.
-- Shown values follow report.shown(), in one place below: an address masked, at most 64
-- characters.
INSERT INTO tollhouse.import_issues
    (run_id, record_no, seq, line_no, severity, column_name, value, code, message)
SELECT %(run_id)s, record_no, seq, line_no, severity, column_name, value, code, message
FROM import_incoming_issues
UNION ALL
SELECT %(run_id)s, c.record_no, x.seq, c.line_no, x.severity, x.column_name,
       (SELECT CASE WHEN char_length(m.v) > 64 THEN left(m.v, 63) || '…' ELSE m.v END
        FROM (SELECT regexp_replace(x.value, '^(.)[^@]*@', '\1***@') AS v) m),
       x.code, x.message
FROM import_classified c
LEFT JOIN import_billing cb ON cb.record_no = c.record_no
CROSS JOIN LATERAL (
    SELECT 1000 AS seq, 'error' AS severity, 'user_id' AS column_name, c.user_id::text AS value,
           'duplicate_user_id' AS code,
           'user_id already on record ' || c.id_first || '; record not imported' AS message
    WHERE c.outcome = 'failed:duplicate_user_id'
    UNION ALL
    SELECT 1001, 'error', 'provider_user_id', c.subject, 'duplicate_provider_user_id',
           'this ' || c.provider || ' id belongs to an earlier record with another e-mail'
    WHERE c.outcome = 'failed:duplicate_provider_user_id'
    UNION ALL
    SELECT 1002, 'info', CASE WHEN c.email IS NULL THEN 'user_id' ELSE 'email' END,
           coalesce(c.email, c.user_id::text),
           'existing_user',
           'skipped: this user_id, or this e-mail under another user_id, belongs to a user'
           || ' already in the database (not one an import of this user_id made): not changed'
    WHERE c.outcome = 'skipped:existing_user'
    UNION ALL
    SELECT 1003, 'info', 'provider_user_id', c.subject, 'existing_identity',
           CASE WHEN c.email IS NULL
                THEN 'skipped: no e-mail, and this ' || c.provider || ' id belongs to a user'
                     || ' already in the database with another user_id: that user is not'
                     || ' changed'
                ELSE 'skipped: this ' || c.provider
                     || ' id belongs to another user already in the database: not linked'
           END
    WHERE c.outcome = 'skipped:existing_identity'
    UNION ALL
    -- A record without an e-mail was matched by its provider id: that is the column shown.
    SELECT 1004, 'info', CASE WHEN c.email IS NULL THEN 'provider_user_id' ELSE 'email' END,
           coalesce(c.email, c.subject),
           'duplicate_of_record:' || c.email_first,
           -- (A later record of an unchanged user that brings nothing is unchanged itself.)
           CASE WHEN c.outcome = 'unchanged' THEN 'already ' ELSE '' END || CASE
               WHEN c.outcome = 'skipped:duplicate'
                   THEN 'skipped: record ' || c.email_first || ' was not imported'
               WHEN c.email IS NULL
                   THEN 'merged into the user of record ' || c.email_first || ', which holds'
                        || ' its ' || c.provider || ' id; a record without an e-mail brings'
                        || ' nothing'
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
       OR (c.outcome = 'unchanged' AND c.record_no <> c.email_first)
    UNION ALL
    SELECT 1005, 'warning', 'credits_balance', c.credits_balance::text,
           'balance_not_reimported',
           'the opening balance ' || c.credits_balance_before || ' was imported before and'
           || ' is not changed by a rerun; use a credits grant or debit'
    WHERE c.outcome IN ('updated', 'unchanged') AND c.record_no = c.email_first
      AND c.credits_balance <> c.credits_balance_before
    UNION ALL
    SELECT 1006, 'warning', 'stripe_customer_id', c.stripe_customer_id,
           'customer_linked_elsewhere',
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
-- and the import's provenance row. E-mails are unverified (RELIABILITY 7.2 rule 6). A
-- record staged without an e-mail makes a user without one, as UserService.create
-- does (no user_emails or email_routes row; its identity's e-mail NULL).
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
    INSERT INTO tollhouse.email_routes (email, user_id)
    SELECT email, user_id FROM s WHERE email IS NOT NULL
), email AS (
    INSERT INTO tollhouse.user_emails (user_id, email, is_primary, verified, via)
    SELECT user_id, email, true, false, 'import' FROM s WHERE email IS NOT NULL
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
-- The new users' credit accounts with their opening balances: what
-- tollhouse.credit_import_accounts_v1 (migration 0007) writes, row for row, read straight
-- from the staged rows. Each account, its `import` grant (once per user: source_id
-- 'import:<user id>') and the grant's ledger row come from this one statement, so balance =
-- ledger = grants by construction. The imported balance stands for the current period's
-- allowance (allowance_for = period_start). An account that exists already is left alone.
-- Batches in parallel offset their bulk ids by `after` (disjoint ranges of apply_no).
-- Run between accounts_joins and accounts_joins_done: the staged rows of a run are not
-- analysed (the service cannot), so the planner expects one row from the batch's range and
-- would join the written accounts back to it by a nested loop, 10,000 x 10,000 comparisons.
WITH input AS MATERIALIZED (
    SELECT s.tenant_id, s.user_id, s.plan, s.credits_balance AS balance, s.daily_cap,
           s.last_daily_reset AS last_reset,
           coalesce(s.period_end - interval '1 month', now()) AS period_start,
           coalesce(s.period_end, now() + interval '1 month') AS period_end,
           jsonb_build_object('import_run', s.run_id, 'record_no', s.record_no,
                              'legacy_tier', s.legacy_tier, 'credits_total', s.credits_total)
               AS metadata
    FROM tollhouse.import_staging s
    WHERE s.run_id = %(run_id)s AND s.apply_no > %(after)s AND s.apply_no <= %(through)s
      AND s.outcome = 'created'
), acc AS (
    INSERT INTO tollhouse.credit_accounts AS a
        (tenant_id, plan, balance, overdraft_limit, daily_cap, day_start, period_start,
         period_end, allowance_for, created_at)
    SELECT i.tenant_id, pl.name, i.balance, pl.overdraft_limit,
           coalesce(i.daily_cap, pl.daily_cap), (i.last_reset AT TIME ZONE 'UTC')::date,
           i.period_start, i.period_end, i.period_start, i.period_start
    FROM input i JOIN tollhouse.plans pl ON pl.name = i.plan
    ON CONFLICT (tenant_id) DO NOTHING
    RETURNING a.tenant_id
), base AS (
    SELECT tollhouse.uuid7() AS grants, tollhouse.uuid7() AS ledger
), opening AS (
    SELECT i.tenant_id, i.user_id, i.balance, i.metadata,
           row_number() OVER (ORDER BY i.tenant_id) + %(after)s::bigint * 1048576 AS n
    FROM acc JOIN input i ON i.tenant_id = acc.tenant_id
    WHERE i.balance > 0
), ids AS (
    -- tollhouse.uuid7_seq(base, n) written out (see stage).
    SELECT o.*,
           encode(overlay(uuid_send(b.grants) PLACING int8send(o.n - 9223372036854775807 - 1)
                          FROM 9 FOR 8), 'hex')::uuid AS grant_id,
           encode(overlay(uuid_send(b.ledger) PLACING int8send(o.n - 9223372036854775807 - 1)
                          FROM 9 FOR 8), 'hex')::uuid AS ledger_id
    FROM opening o CROSS JOIN base b
), g AS (
    INSERT INTO tollhouse.credit_grants
        (tenant_id, id, source, source_id, total, remaining, priority, expires_at)
    SELECT o.tenant_id, o.grant_id, 'import', 'import:' || o.user_id, o.balance, o.balance, 0,
           NULL
    FROM ids o
), l AS (
    INSERT INTO tollhouse.credit_ledger
        (tenant_id, id, kind, reason, delta, balance_after, grant_id, metadata)
    SELECT o.tenant_id, o.ledger_id, 'grant', 'grant.import', o.balance, o.balance,
           o.grant_id, o.metadata
    FROM ids o
)
SELECT count(*)::integer FROM acc

-- name: accounts_joins
-- For apply_accounts only (see there): hash joins.
SET LOCAL enable_nestloop = off

-- name: accounts_joins_done
SET LOCAL enable_nestloop TO DEFAULT

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
-- subscription leaves the free plan). An account this batch opened that is on its effective
-- plan already, inside its period, is skipped: credit_change_plan_v1 would change nothing
-- there (same plan; no period to roll, no allowance owed, nothing reserved, and the import
-- grant never expires), and that call was most of the step's time.
WITH b AS MATERIALIZED (
    SELECT DISTINCT s.tenant_id, s.outcome,
           tollhouse.billing_effective_plan_v1(s.tenant_id) AS plan
    FROM tollhouse.import_staging s
    WHERE s.run_id = %(run_id)s AND s.apply_no > %(after)s AND s.apply_no <= %(through)s
      AND s.outcome IN ('created', 'updated') AND s.stripe_subscription_id IS NOT NULL
)
SELECT count(*) FILTER (WHERE c.changed)
FROM (SELECT b.tenant_id, b.plan
      FROM b LEFT JOIN tollhouse.credit_accounts a ON a.tenant_id = b.tenant_id
      WHERE NOT (b.outcome = 'created' AND a.plan = b.plan AND a.period_end > now()
                 AND a.allowance_for = a.period_start AND a.reserved = 0)
      ORDER BY b.tenant_id) m,
     LATERAL tollhouse.credit_change_plan_v1(m.tenant_id, NULL, m.plan) c

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
