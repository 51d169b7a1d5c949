"""Migration 0016 moved the single-column checks of the tables a webhook event writes into
domains. Each rule still refuses what it refused, by INSERT and by UPDATE, with
SQLSTATE 23514 and the constraint name the service maps to its errors; the values at each
rule's edge are still accepted."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tollhouse.db import migrate

TENANT = uuid.UUID("00000000-0000-7000-8000-000000000016")

#: A valid row of each table, as SQL expressions; a case replaces one column's.
ROWS: dict[str, dict[str, str]] = {
    "credit_accounts": {
        "tenant_id": f"'{TENANT}'",
        "plan": "'free'",
        "period_start": "now()",
        "period_end": "now() + interval '30 days'",
    },
    "credit_grants": {
        "tenant_id": f"'{TENANT}'",
        "id": "gen_random_uuid()",
        "source": "'promo'",
        "source_id": "'promo:' || gen_random_uuid()",
        "total": "10",
        "remaining": "1",
    },
    "credit_ledger": {
        "tenant_id": f"'{TENANT}'",
        "id": "gen_random_uuid()",
        "kind": "'grant'",
        "reason": "'grant.promo'",
        "delta": "10",
        "balance_after": "10",
    },
    "billing_events": {
        "stripe_event_id": "'evt_' || gen_random_uuid()",
        "type": "'customer.updated'",
        "payload_hash": "repeat('ab', 32)",
        "payload": "'{}'",
        "event_created": "now()",
    },
    "subscriptions": {
        "tenant_id": f"'{TENANT}'",
        "id": "'sub_' || gen_random_uuid()",
        "customer_id": "'cus_domains'",
        "status": "'active'",
        "stripe_at": "now()",
    },
}

#: (constraint, table, column, refused values, accepted values at the rule's edge).
RULES: list[tuple[str, str, str, list[str], list[str]]] = [
    ("credit_grants_source_check", "credit_grants", "source", ["'gift'", "''"], ["'refund'"]),
    (
        "credit_grants_source_id_check",
        "credit_grants",
        "source_id",
        ["''", "repeat('x', 201)"],
        ["repeat('y', 200)", "NULL"],
    ),
    ("credit_grants_total_check", "credit_grants", "total", ["0", "-1"], ["1"]),
    ("credit_accounts_daily_cap_check", "credit_accounts", "daily_cap", ["0"], ["1", "NULL"]),
    ("credit_accounts_daily_used_check", "credit_accounts", "daily_used", ["-1"], ["0"]),
    (
        "credit_accounts_overdraft_limit_check",
        "credit_accounts",
        "overdraft_limit",
        ["-1"],
        ["0"],
    ),
    ("credit_accounts_reserved_check", "credit_accounts", "reserved", ["-1"], ["0"]),
    ("credit_ledger_kind_check", "credit_ledger", "kind", ["'hold'"], ["'refund'"]),
    (
        "credit_ledger_reason_check",
        "credit_ledger",
        "reason",
        ["'Grant'", "'9x'", "repeat('a', 65)"],
        ["repeat('a', 64)", "'a.b:c-d_0'"],
    ),
    (
        "credit_ledger_metadata_check",
        "credit_ledger",
        "metadata",
        ["'[]'", "'1'"],
        ["'{\"a\": 1}'"],
    ),
    (
        "billing_events_payload_hash_check",
        "billing_events",
        "payload_hash",
        ["repeat('A', 64)", "repeat('a', 63)"],
        ["repeat('0', 64)"],
    ),
    ("billing_events_source_check", "billing_events", "source", ["'cli'"], ["'api'"]),
    ("billing_events_status_check", "billing_events", "status", ["'done'"], ["'parked'"]),
    ("subscriptions_status_check", "subscriptions", "status", ["'Active'"], ["'paused'"]),
]


def _insert(table: str, column: str, value: str) -> str:
    row = dict(ROWS[table], **{column: value})
    if table == "credit_accounts":  # one account per tenant: a tenant of its own
        row["tenant_id"] = "(SELECT id FROM new_tenant)"
        return (
            "WITH new_tenant AS (INSERT INTO tollhouse.tenants"
            " (id, name, owner_user_id, is_default)"
            " VALUES (gen_random_uuid(), 't', gen_random_uuid(), true) RETURNING id)"
            f" INSERT INTO tollhouse.credit_accounts ({', '.join(row)})"
            f" VALUES ({', '.join(row.values())})"
        )
    return f"INSERT INTO tollhouse.{table} ({', '.join(row)}) VALUES ({', '.join(row.values())})"


def _values(table: str) -> str:
    row = ROWS[table]
    return f"INSERT INTO tollhouse.{table} ({', '.join(row)}) VALUES ({', '.join(row.values())})"


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """The table owner's connection, in a transaction, with one valid row in each table."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO tollhouse.tenants (id, name, owner_user_id, is_default)"
            " VALUES (%s, 't', %s, true)",
            (TENANT, uuid.uuid4()),
        )
        conn.execute(
            "INSERT INTO tollhouse.billing_customers (tenant_id, customer_id)"
            " VALUES (%s, 'cus_domains')",
            (TENANT,),
        )
        for table in ROWS:
            conn.execute(_values(table))
        yield conn


def _refused(conn: psycopg.Connection[Any], statement: str) -> str | None:
    """The name of the check that refused `statement` (None if it was accepted)."""
    conn.execute("SAVEPOINT rule")
    try:
        conn.execute(statement)
    except psycopg.errors.CheckViolation as exc:
        conn.execute("ROLLBACK TO SAVEPOINT rule")
        return exc.diag.constraint_name
    conn.execute("ROLLBACK TO SAVEPOINT rule")
    return None


@pytest.mark.parametrize(
    ("constraint", "table", "column", "refused", "accepted"),
    RULES,
    ids=[rule[0] for rule in RULES],
)
def test_each_rule_still_refuses_by_insert_and_update(
    conn: psycopg.Connection[Any],
    constraint: str,
    table: str,
    column: str,
    refused: list[str],
    accepted: list[str],
) -> None:
    key = "stripe_event_id" if table == "billing_events" else "tenant_id"
    for value in refused:
        assert _refused(conn, _insert(table, column, value)) == constraint, value
        assert (
            _refused(
                conn, f"UPDATE tollhouse.{table} SET {column} = {value} WHERE {key} IS NOT NULL"
            )
            == constraint
        ), value
    for value in accepted:
        assert _refused(conn, _insert(table, column, value)) is None, value
        assert (
            _refused(
                conn, f"UPDATE tollhouse.{table} SET {column} = {value} WHERE {key} IS NOT NULL"
            )
            is None
        ), value


def test_the_columns_take_their_domains_and_keep_not_null(conn: psycopg.Connection[Any]) -> None:
    """Every moved rule is a domain's, on the column it guarded; none is left on a table."""
    rows = conn.execute(
        "SELECT c.conname, a.attrelid::regclass::text, a.attname, a.attnotnull"
        " FROM pg_constraint c JOIN pg_attribute a ON a.atttypid = c.contypid"
        " JOIN pg_class r ON r.oid = a.attrelid AND r.relkind = 'r'"
        " WHERE c.conname = ANY (%s)",
        ([rule[0] for rule in RULES],),
    ).fetchall()
    assert sorted((name, table, column) for name, table, column, _ in rows) == sorted(
        (name, f"tollhouse.{table}", column) for name, table, column, _, _ in RULES
    )
    nullable = {column for _, _, column, notnull in rows if not notnull}
    assert nullable == {"source_id", "daily_cap"}
    on_tables = conn.execute(
        "SELECT count(*) FROM pg_constraint WHERE conname = ANY (%s) AND conrelid <> 0",
        ([rule[0] for rule in RULES],),
    ).fetchone()
    assert on_tables == (0,)


def test_no_type_takes_a_name_stripe_sync_engine_looks_up(conn: psycopg.Connection[Any]) -> None:
    """stripe-sync-engine's migrations (0.48.5), which may run in the same database, skip
    creating each of these enums when a type of that bare name exists in any schema, and
    then fail to create the tables that use them."""
    taken = conn.execute(
        "SELECT typname FROM pg_type WHERE typnamespace = 'tollhouse'::regnamespace"
        " AND typname = ANY (%s)",
        (
            [
                "invoice_status",
                "pricing_tiers",
                "pricing_type",
                "subscription_schedule_status",
                "subscription_status",
            ],
        ),
    ).fetchall()
    assert taken == []


async def test_0016_keeps_the_stored_rows_and_their_statistics(empty_dsn: str) -> None:
    """On a database at 0015 with billing events stored: 0016 keeps the rows and the table's
    storage (no rewrite), gathers the moved columns' statistics again, leaves empty tables
    never analyzed (analyzed empty, they were planned as empty), and the rules hold."""
    migrations = migrate.load_migrations()
    (at,) = [n for n, m in enumerate(migrations) if m.filename == "0016_check_domains.sql"]
    await migrate.migrate(empty_dsn, migrations[:at])
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tollhouse.billing_events"
            " (stripe_event_id, type, payload_hash, payload, event_created, status)"
            " SELECT 'evt_' || n, 'customer.updated', md5(n::text) || md5(n::text), '{}',"
            "        now(), CASE WHEN n % 3 = 0 THEN 'processed' ELSE 'ignored' END"
            " FROM generate_series(1, 300) n"
        )
        storage = conn.execute(
            "SELECT relfilenode FROM pg_class WHERE oid = 'tollhouse.billing_events'::regclass"
        ).fetchone()
    await migrate.migrate(empty_dsn, migrations[: at + 1])
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert (
            conn.execute(
                "SELECT relfilenode FROM pg_class WHERE oid = 'tollhouse.billing_events'::regclass"
            ).fetchone()
            == storage
        )
        assert conn.execute(
            "SELECT status, count(*) FROM tollhouse.billing_events GROUP BY 1 ORDER BY 1"
        ).fetchall() == [("ignored", 200), ("processed", 100)]
        analyzed = conn.execute(
            "SELECT tablename, attname FROM pg_stats WHERE schemaname = 'tollhouse'"
            " AND tablename = ANY (%s) ORDER BY 1, 2",
            ([table for table in ROWS],),
        ).fetchall()
        assert analyzed == [
            ("billing_events", "payload_hash"),
            ("billing_events", "source"),
            ("billing_events", "status"),
        ]
        never = conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'tollhouse'::regnamespace"
            " AND relname = ANY (%s) AND reltuples < 0 ORDER BY 1",
            ([table for table in ROWS],),
        ).fetchall()
        assert never == [(t,) for t in sorted(ROWS) if t != "billing_events"]
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute("UPDATE tollhouse.billing_events SET status = 'done'")
        assert refused.value.diag.constraint_name == "billing_events_status_check"
