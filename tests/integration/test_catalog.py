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
