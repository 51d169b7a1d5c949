"""A run's staged rows and report rows belong to it (migration 0015): checked once per
statement instead of by a foreign key per row, with the same guarantees. The rows name an
existing run, the run is locked against deletion until the writer commits, a deleted run
takes its rows with it (under READ COMMITTED; other levels are refused), and a run keeps
its id."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from tollhouse.ids import uuid7

STAGED = """
INSERT INTO tollhouse.import_staging
    (run_id, apply_no, record_no, outcome, user_id, target_user_id, email, provider, status,
     marketing, legacy_tier, plan, credits_balance, fingerprint)
SELECT CASE WHEN n = %(odd)s THEN %(other)s ELSE %(run_id)s END, n, n, 'created',
       gen_random_uuid(), gen_random_uuid(),
       'u' || n || '@example.com', 'email', 'active', true, 'free', 'free', 0, md5(n::text)
FROM generate_series(1, %(rows)s) n
"""
ISSUES = """
INSERT INTO tollhouse.import_issues
    (run_id, record_no, seq, line_no, severity, column_name, value, code, message)
SELECT CASE WHEN n = %(odd)s THEN %(other)s ELSE %(run_id)s END, n, 0, n + 1, 'warning',
       'email', 'x', 'some_code', 'a message'
FROM generate_series(1, %(rows)s) n
"""
#: Rows 1..rows for run_id, except row `odd`, which names `other`.
NO_ODD = {"odd": 0, "other": None}
COUNT = """
SELECT (SELECT count(*) FROM tollhouse.import_staging WHERE run_id = %(run_id)s),
       (SELECT count(*) FROM tollhouse.import_issues WHERE run_id = %(run_id)s)
"""


async def new_run(conn: psycopg.AsyncConnection[Any]) -> uuid.UUID:
    run_id = uuid7()
    await conn.execute(
        "INSERT INTO tollhouse.import_runs"
        " (id, file_sha256, options_sha256, file_name, options, records, counts)"
        " VALUES (%s, %s, %s, 'users.csv', '{}', 3, '{}')",
        (run_id, uuid.uuid4().bytes * 2, uuid.uuid4().bytes * 2),
    )
    return run_id


async def rows_of(conn: psycopg.AsyncConnection[Any], run_id: uuid.UUID) -> tuple[int, int]:
    cur = await conn.execute(COUNT, {"run_id": run_id})
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.parametrize("statement", [STAGED, ISSUES], ids=["staging", "issues"])
async def test_rows_naming_no_run_are_refused_whole(service_dsn: str, statement: str) -> None:
    async with await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as conn:
        run_id = await new_run(conn)
        stranger = uuid7()
        # One row naming no run: the statement writes nothing.
        with pytest.raises(psycopg.errors.ForeignKeyViolation) as caught:
            await conn.execute(
                statement, {"run_id": run_id, "rows": 3, "odd": 2, "other": stranger}
            )
        assert str(stranger) in str(caught.value.diag.message_detail)
        assert await rows_of(conn, run_id) == (0, 0)
        assert await rows_of(conn, stranger) == (0, 0)
        # Rows of the run alone are written.
        await conn.execute(statement, {"run_id": run_id, "rows": 3, **NO_ODD})
        assert sum(await rows_of(conn, run_id)) == 3


async def test_a_deleted_run_takes_its_rows_and_only_its_rows(service_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as conn:
        gone, kept = await new_run(conn), await new_run(conn)
        for run_id in (gone, kept):
            await conn.execute(STAGED, {"run_id": run_id, "rows": 5, **NO_ODD})
            await conn.execute(ISSUES, {"run_id": run_id, "rows": 4, **NO_ODD})
        await conn.execute("DELETE FROM tollhouse.import_runs WHERE id = %s", (gone,))
        assert await rows_of(conn, gone) == (0, 0)
        assert await rows_of(conn, kept) == (5, 4)


async def test_emptying_the_runs_empties_their_rows(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        run_id = await new_run(conn)
        await conn.execute(STAGED, {"run_id": run_id, "rows": 2, **NO_ODD})
        await conn.execute(ISSUES, {"run_id": run_id, "rows": 3, **NO_ODD})
        await conn.execute("TRUNCATE tollhouse.import_runs")
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM tollhouse.import_staging),"
            " (SELECT count(*) FROM tollhouse.import_issues)"
        )
        assert await cur.fetchone() == (0, 0)


async def test_a_run_keeps_its_id(service_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as conn:
        run_id = await new_run(conn)
        await conn.execute(ISSUES, {"run_id": run_id, "rows": 2, **NO_ODD})
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            await conn.execute(
                "UPDATE tollhouse.import_runs SET id = %s WHERE id = %s", (uuid7(), run_id)
            )
        # Other columns change as before.
        await conn.execute(
            "UPDATE tollhouse.import_runs SET status = 'done' WHERE id = %s", (run_id,)
        )
        assert await rows_of(conn, run_id) == (0, 2)


async def test_a_run_being_written_cannot_be_deleted_under_the_writer(service_dsn: str) -> None:
    """The check locks the run as a foreign key's check does: a delete of the run waits
    for the writer, then takes the rows the writer committed (none is left behind)."""
    async with (
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as writer,
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as deleter,
    ):
        run_id = await new_run(writer)
        async with writer.transaction():
            await writer.execute(STAGED, {"run_id": run_id, "rows": 3, **NO_ODD})
            async with deleter.transaction():
                await deleter.execute("SET LOCAL lock_timeout = '200ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    await deleter.execute(
                        "DELETE FROM tollhouse.import_runs WHERE id = %s", (run_id,)
                    )
        assert await rows_of(writer, run_id) == (3, 0)
        await deleter.execute("DELETE FROM tollhouse.import_runs WHERE id = %s", (run_id,))
        assert await rows_of(writer, run_id) == (0, 0)


async def test_rows_for_a_run_deleted_meanwhile_are_refused(service_dsn: str) -> None:
    """A writer that comes after an uncommitted delete of its run waits for it, then finds
    no run: it writes nothing."""
    async with (
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as writer,
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as deleter,
    ):
        run_id = await new_run(writer)
        async with deleter.transaction():
            await deleter.execute("DELETE FROM tollhouse.import_runs WHERE id = %s", (run_id,))
            async with writer.transaction():
                await writer.execute("SET LOCAL lock_timeout = '200ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    await writer.execute(ISSUES, {"run_id": run_id, "rows": 2, **NO_ODD})
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            await writer.execute(ISSUES, {"run_id": run_id, "rows": 2, **NO_ODD})
        assert await rows_of(writer, run_id) == (0, 0)


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
async def test_a_run_is_not_deleted_from_an_older_snapshot(service_dsn: str, level: str) -> None:
    """Under REPEATABLE READ the cascade would not see rows committed after the deleter's
    snapshot, and would leave them behind: such a delete is refused, nothing changes."""
    async with (
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as writer,
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as deleter,
    ):
        run_id = await new_run(writer)
        await deleter.execute(f"BEGIN ISOLATION LEVEL {level}")
        await deleter.execute("SELECT 1")  # the snapshot is taken
        await writer.execute(STAGED, {"run_id": run_id, "rows": 3, **NO_ODD})
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            await deleter.execute("DELETE FROM tollhouse.import_runs WHERE id = %s", (run_id,))
        await deleter.execute("ROLLBACK")
        assert await rows_of(writer, run_id) == (3, 0)
        cur = await writer.execute(
            "SELECT count(*) FROM tollhouse.import_runs WHERE id = %s", (run_id,)
        )
        assert await cur.fetchone() == (1,)


async def test_a_run_committed_while_the_check_waits_is_not_taken_unlocked(
    service_dsn: str,
) -> None:
    """The check locks the runs and finds them in one statement. Run `a` is held by another
    transaction, so the check waits; meanwhile run `b` commits. Either the writer is refused
    or `b` is locked by it: a delete of `b` must not go through under the writer and leave
    its row behind."""
    async with (
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as writer,
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as holder,
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as creator,
        await psycopg.AsyncConnection.connect(service_dsn, autocommit=True) as deleter,
    ):
        a = await new_run(writer)
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM tollhouse.import_runs WHERE id = %s FOR UPDATE", (a,))
        await creator.execute("BEGIN")
        b = await new_run(creator)
        await writer.execute("BEGIN")
        # Rows 1 and 3 name `a`, row 2 names `b`: the check waits for `a`'s lock.
        write = asyncio.create_task(
            writer.execute(STAGED, {"run_id": a, "rows": 3, "odd": 2, "other": b})
        )
        await asyncio.sleep(0.3)
        assert not write.done()
        await creator.execute("COMMIT")
        await holder.execute("COMMIT")
        try:
            await write
        except psycopg.errors.ForeignKeyViolation:
            await writer.execute("ROLLBACK")
        else:
            await deleter.execute("SET lock_timeout = '200ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                await deleter.execute("DELETE FROM tollhouse.import_runs WHERE id = %s", (b,))
            await writer.execute("COMMIT")
        await deleter.execute("DELETE FROM tollhouse.import_runs WHERE id = %s", (b,))
        assert await rows_of(deleter, b) == (0, 0)
