-- The single-column CHECK constraints of the tables a Stripe webhook event writes (the
-- credits tables among them) become domains, with the same rules under the same constraint
-- names.
--
-- PostgreSQL keeps a table's CHECK constraints as text and parses, plans and compiles all of
-- them again in every statement that writes the table, then evaluates all of them for each
-- row written, an UPDATE included, whichever columns it changes. A domain's constraints are
-- parsed and planned once per connection (the type cache), and a value is checked when it is
-- stored into the column: by an INSERT, or by an UPDATE that assigns the column. On the
-- webhook benchmark's mix this was a tenth of PostgreSQL's CPU (docs/billing.md, "Checks as
-- domains"): a subscription update writes five constrained tables in about five statements.
--
-- What stays the same: every stored value satisfies the rule it satisfied before (a value
-- enters the column only through its domain); a violation is SQLSTATE 23514 under the same
-- constraint name, which is what the service maps to its errors (tollhouse.db.errors); NOT
-- NULL stays on the columns; clients see the base types (PostgreSQL describes a domain
-- column by its base type). What differs (docs/decisions.md, "Some CHECK constraints are
-- domains"): the violation's message and error fields name the domain instead of the table;
-- the constraints are listed under the domains (pg_constraint.contypid); a domain's rule is
-- checked before NOT NULL and the table's constraints, so a row breaking several rules may
-- be refused under another name than before; a PL/pgSQL variable of these row types checks a
-- field when it is assigned; RETURN QUERY of a moved column into a function's text or bigint
-- result needs a cast. Constraints over two columns stay on their tables
-- (credit_grants_remaining_check, credit_accounts_floor_check, credit_accounts_period_check).
--
-- Each domain is named after its table and column (tollhouse.credit_ledger_reason), its
-- constraint after the table's old one (credit_ledger_reason_check). Names such as
-- subscription_status are taken: stripe-sync-engine's migrations, which may share the
-- database, look their types up by bare name in every schema and skip creating them.
--
-- Applying it: the five tables are locked first, in the order the service writes them, and
-- stay locked until the commit. The domains get their constraints after the columns take
-- them: a column moved to a domain that has constraints is rewritten with all its table's
-- indexes, one without is not (its storage is the base type's). The constraints are added NOT
-- VALID: every stored value passed the identical table constraint that this transaction
-- dropped, under the same locks, and validating would scan each table once per rule again.
-- Still, each ALTER TABLE scans its table once (credit_accounts and credit_grants re-check
-- their two-column constraints) or rebuilds the partial index whose predicate names a moved
-- column (billing_events_parked_idx, credit_ledger_expiry_once_key,
-- subscriptions_current_idx). Changing a column's type drops its statistics: the moved
-- columns of tables that have rows are analyzed at the end. Running services must be
-- restarted after it: a statement a connection prepared before returns a column whose type
-- changed, and fails with 0A000 ("cached plan must not change result type") until the
-- connection is replaced.

LOCK TABLE tollhouse.subscriptions, tollhouse.credit_accounts, tollhouse.credit_grants,
    tollhouse.credit_ledger, tollhouse.billing_events IN ACCESS EXCLUSIVE MODE;

CREATE DOMAIN tollhouse.credit_grants_source AS text;
CREATE DOMAIN tollhouse.credit_grants_source_id AS text;
CREATE DOMAIN tollhouse.credit_grants_total AS bigint;
ALTER TABLE tollhouse.credit_grants
    DROP CONSTRAINT credit_grants_source_check,
    DROP CONSTRAINT credit_grants_source_id_check,
    DROP CONSTRAINT credit_grants_total_check,
    ALTER COLUMN source TYPE tollhouse.credit_grants_source,
    ALTER COLUMN source_id TYPE tollhouse.credit_grants_source_id,
    ALTER COLUMN total TYPE tollhouse.credit_grants_total;
ALTER DOMAIN tollhouse.credit_grants_source
    ADD CONSTRAINT credit_grants_source_check
    CHECK (VALUE IN ('plan', 'purchase', 'promo', 'adjustment', 'import', 'refund')) NOT VALID;
ALTER DOMAIN tollhouse.credit_grants_source_id
    ADD CONSTRAINT credit_grants_source_id_check
    CHECK (char_length(VALUE) BETWEEN 1 AND 200) NOT VALID;
ALTER DOMAIN tollhouse.credit_grants_total
    ADD CONSTRAINT credit_grants_total_check CHECK (VALUE > 0) NOT VALID;

CREATE DOMAIN tollhouse.credit_accounts_daily_cap AS bigint;
CREATE DOMAIN tollhouse.credit_accounts_daily_used AS bigint;
CREATE DOMAIN tollhouse.credit_accounts_overdraft_limit AS bigint;
CREATE DOMAIN tollhouse.credit_accounts_reserved AS bigint;
ALTER TABLE tollhouse.credit_accounts
    DROP CONSTRAINT credit_accounts_daily_cap_check,
    DROP CONSTRAINT credit_accounts_daily_used_check,
    DROP CONSTRAINT credit_accounts_overdraft_limit_check,
    DROP CONSTRAINT credit_accounts_reserved_check,
    ALTER COLUMN daily_cap TYPE tollhouse.credit_accounts_daily_cap,
    ALTER COLUMN daily_used TYPE tollhouse.credit_accounts_daily_used,
    ALTER COLUMN overdraft_limit TYPE tollhouse.credit_accounts_overdraft_limit,
    ALTER COLUMN reserved TYPE tollhouse.credit_accounts_reserved;
ALTER DOMAIN tollhouse.credit_accounts_daily_cap
    ADD CONSTRAINT credit_accounts_daily_cap_check CHECK (VALUE > 0) NOT VALID;
ALTER DOMAIN tollhouse.credit_accounts_daily_used
    ADD CONSTRAINT credit_accounts_daily_used_check CHECK (VALUE >= 0) NOT VALID;
ALTER DOMAIN tollhouse.credit_accounts_overdraft_limit
    ADD CONSTRAINT credit_accounts_overdraft_limit_check CHECK (VALUE >= 0) NOT VALID;
ALTER DOMAIN tollhouse.credit_accounts_reserved
    ADD CONSTRAINT credit_accounts_reserved_check CHECK (VALUE >= 0) NOT VALID;

CREATE DOMAIN tollhouse.credit_ledger_kind AS text;
CREATE DOMAIN tollhouse.credit_ledger_reason AS text;
CREATE DOMAIN tollhouse.credit_ledger_metadata AS jsonb;
ALTER TABLE tollhouse.credit_ledger
    DROP CONSTRAINT credit_ledger_kind_check,
    DROP CONSTRAINT credit_ledger_reason_check,
    DROP CONSTRAINT credit_ledger_metadata_check,
    ALTER COLUMN kind TYPE tollhouse.credit_ledger_kind,
    ALTER COLUMN reason TYPE tollhouse.credit_ledger_reason,
    ALTER COLUMN metadata TYPE tollhouse.credit_ledger_metadata;
ALTER DOMAIN tollhouse.credit_ledger_kind
    ADD CONSTRAINT credit_ledger_kind_check
    CHECK (VALUE IN ('debit', 'grant', 'expiry', 'refund')) NOT VALID;
ALTER DOMAIN tollhouse.credit_ledger_reason
    ADD CONSTRAINT credit_ledger_reason_check
    CHECK (VALUE ~ '^[a-z][a-z0-9_.:-]*$' AND octet_length(VALUE) <= 64) NOT VALID;
ALTER DOMAIN tollhouse.credit_ledger_metadata
    ADD CONSTRAINT credit_ledger_metadata_check CHECK (jsonb_typeof(VALUE) = 'object') NOT VALID;

CREATE DOMAIN tollhouse.billing_events_payload_hash AS text;
CREATE DOMAIN tollhouse.billing_events_source AS text;
CREATE DOMAIN tollhouse.billing_events_status AS text;
ALTER TABLE tollhouse.billing_events
    DROP CONSTRAINT billing_events_payload_hash_check,
    DROP CONSTRAINT billing_events_source_check,
    DROP CONSTRAINT billing_events_status_check,
    ALTER COLUMN payload_hash TYPE tollhouse.billing_events_payload_hash,
    ALTER COLUMN source TYPE tollhouse.billing_events_source,
    ALTER COLUMN status TYPE tollhouse.billing_events_status;
ALTER DOMAIN tollhouse.billing_events_payload_hash
    ADD CONSTRAINT billing_events_payload_hash_check CHECK (VALUE ~ '^[0-9a-f]{64}$') NOT VALID;
ALTER DOMAIN tollhouse.billing_events_source
    ADD CONSTRAINT billing_events_source_check CHECK (VALUE IN ('webhook', 'api')) NOT VALID;
ALTER DOMAIN tollhouse.billing_events_status
    ADD CONSTRAINT billing_events_status_check
    CHECK (VALUE IN ('received', 'processed', 'failed', 'ignored', 'parked')) NOT VALID;

CREATE DOMAIN tollhouse.subscriptions_status AS text;
ALTER TABLE tollhouse.subscriptions
    DROP CONSTRAINT subscriptions_status_check,
    ALTER COLUMN status TYPE tollhouse.subscriptions_status;
ALTER DOMAIN tollhouse.subscriptions_status
    ADD CONSTRAINT subscriptions_status_check
    CHECK (VALUE IN ('incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due',
                     'canceled', 'unpaid', 'paused')) NOT VALID;

-- A type change drops the columns' statistics: gather them again, for the columns that now
-- have a domain, where there are rows. An empty table (a fresh install) stays never analyzed:
-- analyzed empty, the planner would plan for an empty table until autovacuum analyzes it again.
DO $$
DECLARE
    r record;
    v_rows boolean;
BEGIN
    FOR r IN
        SELECT format('tollhouse.%I', c.relname) AS table_name,
               string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) AS columns
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid AND c.relkind = 'r'
        JOIN pg_type t ON t.oid = a.atttypid AND t.typtype = 'd'
        WHERE c.relnamespace = 'tollhouse'::regnamespace
          AND t.typnamespace = 'tollhouse'::regnamespace AND NOT a.attisdropped
        GROUP BY c.relname
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT FROM %s)', r.table_name) INTO v_rows;
        IF v_rows THEN
            EXECUTE format('ANALYZE %s (%s)', r.table_name, r.columns);
        END IF;
    END LOOP;
END
$$;
