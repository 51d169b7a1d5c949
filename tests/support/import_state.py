"""What an import leaves in the database, read as the owner: row counts of every table
it writes, and a checksum of the users, identities, accounts, ledger and billing state
(customers, their routes, subscriptions) that ignores generated ids and wall-clock times (so
two runs on two databases compare equal)."""

from __future__ import annotations

import psycopg

TABLES = (
    "users",
    "user_emails",
    "email_routes",
    "user_identities",
    "identity_routes",
    "user_roles",
    "user_email_preferences",
    "tenants",
    "tenant_members",
    "credit_accounts",
    "credit_grants",
    "credit_ledger",
    "import_users",
    "billing_customers",
    "billing_customer_routes",
    "subscriptions",
)

CHECKSUM = """
SELECT md5(string_agg(line, E'\\n' ORDER BY line)) FROM (
    SELECT 'u|' || u.id || '|' || coalesce(u.display_name, '') || '|' || u.status || '|'
           || coalesce(u.plan_override, '') || '|' || u.created_at || '|'
           || coalesce(u.last_seen_at::text, '') || '|' || p.marketing AS line
    FROM tollhouse.users u JOIN tollhouse.user_email_preferences p ON p.user_id = u.id
    UNION ALL
    SELECT 'e|' || user_id || '|' || email || '|' || is_primary || '|' || verified || '|' || via
    FROM tollhouse.user_emails
    UNION ALL
    SELECT 'i|' || user_id || '|' || provider || '|' || subject FROM tollhouse.user_identities
    UNION ALL
    SELECT 'a|' || t.owner_user_id || '|' || a.plan || '|' || a.balance || '|'
           || coalesce(a.daily_cap::text, '') || '|' || coalesce(a.day_start::text, '') || '|'
           || a.overdraft_limit
    FROM tollhouse.credit_accounts a JOIN tollhouse.tenants t ON t.id = a.tenant_id
    UNION ALL
    SELECT 'l|' || t.owner_user_id || '|' || l.kind || '|' || l.reason || '|' || l.delta || '|'
           || l.balance_after
    FROM tollhouse.credit_ledger l JOIN tollhouse.tenants t ON t.id = l.tenant_id
    UNION ALL
    SELECT 'g|' || t.owner_user_id || '|' || g.source || '|' || g.source_id || '|' || g.total
    FROM tollhouse.credit_grants g JOIN tollhouse.tenants t ON t.id = g.tenant_id
    UNION ALL
    SELECT 'c|' || t.owner_user_id || '|' || c.provider || '|' || c.customer_id || '|'
           || coalesce(c.email, '') || '|' || coalesce(c.name, '') || '|' || c.deleted || '|'
           || coalesce(c.stripe_at::text, '')
    FROM tollhouse.billing_customers c JOIN tollhouse.tenants t ON t.id = c.tenant_id
    UNION ALL
    SELECT 'r|' || r.provider || '|' || r.customer_id || '|' || t.owner_user_id
    FROM tollhouse.billing_customer_routes r JOIN tollhouse.tenants t ON t.id = r.tenant_id
    UNION ALL
    SELECT 's|' || t.owner_user_id || '|' || s.id || '|' || s.provider || '|' || s.customer_id
           || '|' || s.status || '|' || coalesce(s.plan, '') || '|'
           || coalesce(s.current_period_end::text, '') || '|' || s.cancel_at_period_end || '|'
           || s.metadata::text || '|' || s.stripe_at
    FROM tollhouse.subscriptions s JOIN tollhouse.tenants t ON t.id = s.tenant_id
) lines
"""


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM tollhouse.{table}").fetchone()[0]  # type: ignore[index]
            for table in TABLES
        }


def checksum(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(CHECKSUM).fetchone()
    assert row is not None
    return str(row[0])


def duplicate_keys(dsn: str) -> int:
    """Imported users with more than one import grant or import ledger row (must be 0)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM (SELECT tenant_id FROM tollhouse.credit_ledger"
            " WHERE reason = 'grant.import' GROUP BY tenant_id HAVING count(*) > 1) d"
        ).fetchone()
    assert row is not None
    return int(row[0])
