"""Catalog audits of the migrated schema (RELIABILITY R-01, R-02, R-07), through the same
checks `tollhouse doctor` runs, each shown able to fail."""

from __future__ import annotations

import psycopg
import pytest

from tollhouse.db.pool import Database
from tollhouse.health import HealthService


async def _doctor(dsn: str) -> dict[str, tuple[bool, str]]:
    checks = await HealthService(Database(dsn)).doctor()
    return {c.name: (c.ok, c.detail) for c in checks}


async def test_the_migrated_schema_passes_every_audit(dsn: str) -> None:
    results = await _doctor(dsn)
    assert {name: ok for name, (ok, _) in results.items()} == {
        "database": True,
        "migrations": True,
        "roles": True,
        "rls": True,
        "functions": True,
        "runtime": True,
    }


@pytest.mark.parametrize(
    ("mutation", "check", "expected"),
    [
        (
            "ALTER TABLE tollhouse.sessions NO FORCE ROW LEVEL SECURITY",
            "rls",
            "sessions",
        ),
        (
            "CREATE FUNCTION tollhouse.loose() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "functions",
            "loose does not pin its search_path; loose is executable by PUBLIC",
        ),
        (
            "CREATE TABLE tollhouse.owned_by_service (id int);"
            " ALTER TABLE tollhouse.owned_by_service OWNER TO tollhouse_service",
            "roles",
            "tollhouse_service owns 1 relation(s)",
        ),
    ],
)
async def test_each_audit_catches_its_mutation(
    dsn: str, mutation: str, check: str, expected: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(mutation)
    ok, detail = (await _doctor(dsn))[check]
    assert not ok
    assert expected in detail


async def test_the_credits_check_catches_a_drifted_balance(dsn: str, service_dsn: str) -> None:
    from tollhouse.app import Tollhouse, credits_conservation
    from tollhouse.credits import DebitRequest

    async with Tollhouse.open(service_dsn, min_size=1, max_size=2) as th:
        user = await th.users.create(email="drift@example.com")
        await th.credits.debit(DebitRequest(amount=1, turn_id="d1", user_id=user.id))
    healthy = await HealthService(Database(dsn), [credits_conservation]).doctor()
    assert {c.name: c.ok for c in healthy}["credits"] is True
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE tollhouse.credit_accounts SET balance = balance + 1")
    drifted = await HealthService(Database(dsn), [credits_conservation]).doctor()
    check = {c.name: c for c in drifted}["credits"]
    assert not check.ok and "ledger 99" in check.detail
