"""Migrations: canonical schema from empty, idempotence, edits detected, concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import psycopg
import pytest

from tollhouse.db import migrate
from tollhouse.db.schema import dump_schema
from tollhouse.errors import (
    MigrationChecksumMismatch,
    MigrationError,
    MigrationsPending,
    UnknownMigrationApplied,
)

SNAPSHOT = Path(__file__).parent.parent / "schema.snapshot"


def _history(dsn: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT version, name, checksum FROM tollhouse.schema_migrations ORDER BY version"
        ).fetchall()


async def test_migrating_an_empty_database_gives_the_canonical_schema(empty_dsn: str) -> None:
    await migrate.migrate(empty_dsn)
    schema = dump_schema(empty_dsn)
    if os.environ.get("TOLLHOUSE_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(schema)
    assert schema == SNAPSHOT.read_text(), (
        "the migrated schema differs from tests/schema.snapshot; if the change is intended,"
        " run the tests with TOLLHOUSE_UPDATE_SNAPSHOT=1 and commit the snapshot"
    )


async def test_second_run_applies_nothing(empty_dsn: str) -> None:
    first = await migrate.migrate(empty_dsn)
    assert [m.filename for m in first] == [m.filename for m in migrate.load_migrations()]
    history = _history(empty_dsn)
    assert await migrate.migrate(empty_dsn) == []
    assert _history(empty_dsn) == history
    statuses = await migrate.status(empty_dsn)
    assert {s.state for s in statuses} == {"applied"}


async def test_status_before_anything_lists_pending(empty_dsn: str) -> None:
    statuses = await migrate.status(empty_dsn)
    assert statuses and {s.state for s in statuses} == {"pending"}
    with pytest.raises(MigrationsPending):
        migrate.require_current(statuses)


async def test_an_edited_migration_stops_migrate_naming_the_file(dsn: str) -> None:
    shipped = migrate.load_migrations()
    edited = [
        dataclasses.replace(shipped[0], sql=shipped[0].sql + "\n-- edit\n"),
        *shipped[1:],
    ]
    with pytest.raises(MigrationChecksumMismatch, match=shipped[0].filename) as caught:
        await migrate.migrate(dsn, edited)
    assert caught.value.fields["filename"] == shipped[0].filename
    with pytest.raises(MigrationChecksumMismatch):
        await migrate.verify(dsn, edited)


async def test_an_edit_is_detected_before_later_migrations_run(dsn: str) -> None:
    shipped = migrate.load_migrations()
    edited_first = dataclasses.replace(shipped[0], sql="SELECT 1;")
    extra = migrate.Migration(9999, "later", "9999_later.sql", "CREATE TABLE tollhouse.later ();")
    with pytest.raises(MigrationChecksumMismatch):
        await migrate.migrate(dsn, [edited_first, *shipped[1:], extra])
    assert 9999 not in {v for v, _, _ in _history(dsn)}


async def test_an_unknown_applied_migration_is_refused(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO tollhouse.schema_migrations (version, name, checksum, duration_ms)"
            " VALUES (9998, 'from_the_future', 'x', 0)"
        )
    with pytest.raises(UnknownMigrationApplied, match="9998_from_the_future"):
        await migrate.migrate(dsn)


async def test_a_failing_migration_leaves_nothing_behind(dsn: str) -> None:
    broken = migrate.Migration(
        9000,
        "broken",
        "9000_broken.sql",
        "CREATE TABLE tollhouse.half_done (id int); SELECT 1/0;",
    )
    with pytest.raises(MigrationError, match=r"9000_broken\.sql failed: division by zero"):
        await migrate.migrate(dsn, [*migrate.load_migrations(), broken])
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT to_regclass('tollhouse.half_done')").fetchone()
    assert row == (None,)
    assert 9000 not in {v for v, _, _ in _history(dsn)}


async def test_concurrent_runs_leave_one_consistent_history(empty_dsn: str) -> None:
    results = await asyncio.gather(*(migrate.migrate(empty_dsn) for _ in range(6)))
    applied = [m.version for run in results for m in run]
    expected = [m.version for m in migrate.load_migrations()]
    # Every migration ran exactly once across the six runners...
    assert sorted(applied) == sorted(expected)
    # ...and the history holds each once, with the shipped checksums.
    assert [(v, c) for v, _, c in _history(empty_dsn)] == [
        (m.version, m.checksum) for m in migrate.load_migrations()
    ]


async def test_migrations_run_on_a_second_database_of_the_same_cluster(empty_dsn: str) -> None:
    # Roles are global to a cluster: the template database already created them.
    await migrate.migrate(empty_dsn)
    statuses = await migrate.status(empty_dsn)
    assert {s.state for s in statuses} == {"applied"}


async def test_0020_makes_a_blank_staged_email_null(empty_dsn: str) -> None:
    """A run staged before 0020 (a record without an e-mail as '') and resumed after it must
    write no address for that record: the migration makes its '' NULL."""
    migrations = migrate.load_migrations()
    at = next(i for i, m in enumerate(migrations) if m.version == 20)
    await migrate.migrate(empty_dsn, migrations[:at])
    with psycopg.connect(empty_dsn) as conn:
        row = conn.execute(
            "INSERT INTO tollhouse.import_runs"
            " (id, file_sha256, options_sha256, file_name, options, records, counts)"
            " VALUES (gen_random_uuid(), sha256(''), sha256(''), 'users.csv', '{}', 2, '{}')"
            " RETURNING id"
        ).fetchone()
        assert row is not None
        for record_no, email in ((2, ""), (3, "a@example.com")):
            conn.execute(
                "INSERT INTO tollhouse.import_staging (run_id, apply_no, record_no, outcome,"
                " user_id, target_user_id, email, provider, subject, status, marketing,"
                " legacy_tier, plan, credits_balance, fingerprint)"
                " VALUES (%s, %s, %s, 'created', gen_random_uuid(), gen_random_uuid(), %s,"
                " 'apple', 'a-1', 'active', true, 'free', 'free', 0, 'x')",
                (row[0], record_no, record_no, email),
            )
    await migrate.migrate(empty_dsn)
    with psycopg.connect(empty_dsn) as conn:
        staged = conn.execute(
            "SELECT record_no, email FROM tollhouse.import_staging ORDER BY record_no"
        ).fetchall()
    assert staged == [(2, None), (3, "a@example.com")]
