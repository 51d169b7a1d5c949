"""The pool: error translation, the retry helper, roles and the acting-user pattern."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import pytest
from structlog.testing import capture_logs

import tollhouse as tollhouse_package
from tollhouse.app import Tollhouse
from tollhouse.db import migrate
from tollhouse.db.arrays import int_array, jsonb_array, text_array, uuid_array
from tollhouse.db.pool import Conn, Database, check_server
from tollhouse.errors import (
    ApiKeyNameTaken,
    DatabaseError,
    DatabaseUnavailable,
    MigrationsPending,
    SerializationRetriesExhausted,
    UniqueViolation,
    UnsafeDatabaseSettings,
)


async def test_unique_violation_is_translated_by_constraint_name(tollhouse: Tollhouse) -> None:
    await tollhouse.keys.create("same")
    with pytest.raises(ApiKeyNameTaken) as caught:
        await tollhouse.keys.create("same")
    assert caught.value.fields["constraint"] == "service_api_keys_active_name_key"
    assert isinstance(caught.value, UniqueViolation)
    assert isinstance(caught.value.__cause__, psycopg.errors.UniqueViolation)


async def test_unmapped_errors_become_generic_database_errors(tollhouse: Tollhouse) -> None:
    with pytest.raises(DatabaseError) as caught:
        async with tollhouse.db.connection() as conn:
            await conn.execute("SELECT * FROM tollhouse.no_such_table")
    assert caught.value.fields["sqlstate"] == "42P01"


def _as_owner(dsn: str, *statements: str) -> None:
    """Run DDL as the login role, outside the service's pool."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
async def counter(dsn: str, tollhouse: Tollhouse) -> Database:
    _as_owner(
        dsn,
        "CREATE TABLE public.counter (id int PRIMARY KEY, n int NOT NULL)",
        "INSERT INTO public.counter VALUES (1, 0)",
        "GRANT SELECT, UPDATE ON public.counter TO tollhouse_service",
    )
    return tollhouse.db


async def _increment_read_then_write(conn: Conn, barrier: asyncio.Barrier) -> None:
    cur = await conn.execute("SELECT n FROM public.counter WHERE id = 1")
    row = await cur.fetchone()
    assert row is not None
    await barrier.wait()  # both transactions have read before either writes
    await conn.execute("UPDATE public.counter SET n = %s WHERE id = 1", (row[0] + 1,))


async def _count(db: Database) -> int:
    async with db.connection() as conn:
        cur = await conn.execute("SELECT n FROM public.counter WHERE id = 1")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_serializable_conflict_is_retried_until_both_increments_land(
    counter: Database,
) -> None:
    barrier = asyncio.Barrier(2)
    runs = 0

    async def work(conn: Conn) -> None:
        nonlocal runs
        runs += 1
        # Only the first round meets at the barrier; retries run alone.
        if runs <= 2:
            await _increment_read_then_write(conn, barrier)
        else:
            await _increment_read_then_write(conn, asyncio.Barrier(1))

    await asyncio.gather(
        counter.transaction(work, isolation="serializable"),
        counter.transaction(work, isolation="serializable"),
    )
    assert await _count(counter) == 2
    assert runs == 3  # one of the two collided and ran again


async def test_control_without_retry_one_increment_fails(counter: Database) -> None:
    """The naive version of the test above: no retry means a lost or failed update."""
    barrier = asyncio.Barrier(2)

    async def work(conn: Conn) -> None:
        await _increment_read_then_write(conn, barrier)

    results = await asyncio.gather(
        counter.transaction(work, isolation="serializable", attempts=1),
        counter.transaction(work, isolation="serializable", attempts=1),
        return_exceptions=True,
    )
    assert sum(isinstance(r, SerializationRetriesExhausted) for r in results) == 1
    assert await _count(counter) == 1


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
async def test_retry_gives_up_after_the_attempts(tollhouse: Tollhouse, sqlstate: str) -> None:
    calls = 0

    async def always_conflicts(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(
            f"DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '{sqlstate}'; END $$"
        )

    with pytest.raises(SerializationRetriesExhausted):
        await tollhouse.db.transaction(always_conflicts, attempts=3)
    assert calls == 3


async def test_other_errors_are_not_retried(tollhouse: Tollhouse) -> None:
    calls = 0

    async def fails(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("SELECT 1/0")

    with pytest.raises(DatabaseError, match="division by zero"):
        await tollhouse.db.transaction(fails)
    assert calls == 1


async def test_a_transaction_commits_all_or_nothing(counter: Database) -> None:
    async def half_then_fail(conn: Conn) -> None:
        await conn.execute("UPDATE public.counter SET n = 100 WHERE id = 1")
        await conn.execute("SELECT 1/0")

    with pytest.raises(DatabaseError):
        await counter.transaction(half_then_fail)
    assert await _count(counter) == 0


async def _whoami(conn: Conn) -> tuple[str, uuid.UUID | None]:
    cur = await conn.execute("SELECT current_user, tollhouse.current_user_id()")
    row = await cur.fetchone()
    assert row is not None
    return row[0], row[1]


async def test_service_connections_act_as_the_service_role(tollhouse: Tollhouse) -> None:
    async with tollhouse.db.connection() as conn:
        assert await _whoami(conn) == ("tollhouse_service", None)


async def _row_under(service_dsn: str, options: str, query: LiteralString) -> Any:
    """One row read through a pool whose logins start with `options` (the settings a
    server, a role or an operator's environment may give them)."""
    db = Database(psycopg.conninfo.make_conninfo(service_dsn, options=options), min_size=1)
    await db.open()
    try:
        async with db.connection() as conn:
            return await (await conn.execute(query)).fetchone()
    finally:
        await db.close()


async def test_service_connections_count_in_utc_whatever_the_servers_zone(
    service_dsn: str,
) -> None:
    """A login whose zone is another (an operator's PGTZ, ALTER ROLE/DATABASE SET timezone)
    still counts months and days and writes timestamps in UTC."""
    row = await _row_under(
        service_dsn,
        "-c TimeZone=Pacific/Chatham",
        "SELECT current_setting('TimeZone'),"
        " ('2026-03-31 23:30:00+00'::timestamptz + interval '1 month')::text",
    )
    assert row == ("UTC", "2026-04-30 23:30:00+00")


async def test_service_connections_read_timestamps_whatever_the_servers_date_style(
    service_dsn: str,
) -> None:
    """psycopg reads timestamps with a time zone only in the ISO DateStyle, and intervals
    only in the `postgres` IntervalStyle: a login set to others (ALTER DATABASE/ROLE SET
    datestyle) made every such read fail, in the service and in `migrate`, `serve`'s start
    and `doctor` (their own connections). Every connection of ours sets both."""
    options = "-c DateStyle=SQL,DMY -c IntervalStyle=sql_standard"
    row = await _row_under(
        service_dsn,
        options,
        "SELECT current_setting('DateStyle'), current_setting('IntervalStyle'),"
        " '2026-03-31 23:30:00+00'::timestamptz, date '2026-03-31', interval '1 month 2 days'",
    )
    assert row == (
        "ISO, MDY",
        "postgres",
        datetime(2026, 3, 31, 23, 30, tzinfo=UTC),
        date(2026, 3, 31),
        timedelta(days=32),
    )
    elsewhere = psycopg.conninfo.make_conninfo(service_dsn, options=options)
    assert {s.state for s in await migrate.verify(elsewhere)} == {"applied"}


async def test_lanes_have_their_own_few_connections_opened_on_use(service_dsn: str) -> None:
    db = Database(service_dsn, min_size=1, max_size=4)
    await db.open()
    lanes = db.lanes(2, "test-lanes")
    unused = db.lanes(2, "never-used")
    assert not lanes.is_open and not unused.is_open  # nothing opened before the first call
    assert set(db.lanes_stats()) == {"tollhouse-test-lanes", "tollhouse-never-used"}
    assert db.lanes_stats()["tollhouse-never-used"]["pool_size"] == 0
    pids: set[int] = set()

    async def backend(_: int) -> None:
        async with lanes.connection() as conn:
            assert await _whoami(conn) == ("tollhouse_service", None)
            row = await (await conn.execute("SELECT pg_backend_pid(), pg_sleep(0.01)")).fetchone()
            assert row is not None
            pids.add(row[0])

    await asyncio.gather(*(backend(n) for n in range(12)))
    assert lanes.is_open and not unused.is_open
    assert db.lanes_stats()["tollhouse-test-lanes"]["pool_size"] == 2
    assert db.lanes_stats()["tollhouse-never-used"]["pool_size"] == 0
    assert len(pids) <= 2  # at most `size`, whatever the crowd
    assert db.stats().get("requests_num", 0) == 0  # the main pool was not asked
    await db.close()  # closes the lanes with it, used or not: none opens again

    async def use(closed: Database) -> None:
        async with closed.connection():
            pass

    for closed in (lanes, unused):
        with pytest.raises(DatabaseError):
            await asyncio.wait_for(use(closed), timeout=5)
    assert not unused.is_open and not lanes.is_open
    with pytest.raises(DatabaseUnavailable):
        db.lanes(1, "too-late")


async def test_acting_user_is_transaction_local_and_never_leaks(service_dsn: str) -> None:
    # One connection, so the next transaction is sure to reuse it.
    async with Tollhouse.open(service_dsn, min_size=1, max_size=1) as tollhouse:
        alice = uuid.uuid4()
        async with tollhouse.db.as_end_user(alice) as conn:
            assert await _whoami(conn) == ("tollhouse_user", alice)
        async with tollhouse.db.connection() as conn:
            assert await _whoami(conn) == ("tollhouse_service", None)


async def test_acting_user_is_undone_when_the_transaction_fails(service_dsn: str) -> None:
    async with Tollhouse.open(service_dsn, min_size=1, max_size=1) as tollhouse:
        with pytest.raises(DatabaseError):
            async with tollhouse.db.as_end_user(uuid.uuid4()) as conn:
                await conn.execute("SELECT 1/0")
        async with tollhouse.db.connection() as conn:
            assert await _whoami(conn) == ("tollhouse_service", None)


async def test_end_user_role_sees_no_rows_without_a_policy(tollhouse: Tollhouse) -> None:
    await tollhouse.keys.create("hidden")
    async with tollhouse.db.as_end_user(uuid.uuid4()) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("SELECT count(*) FROM tollhouse.service_api_keys")


async def test_forced_rls_binds_even_a_role_with_table_rights(
    dsn: str, tollhouse: Tollhouse
) -> None:
    """Grant the end-user role SELECT but no policy: forced RLS still shows it nothing."""
    await tollhouse.keys.create("hidden")
    _as_owner(dsn, "GRANT SELECT ON tollhouse.service_api_keys TO tollhouse_user")
    async with tollhouse.db.as_end_user(uuid.uuid4()) as conn:
        cur = await conn.execute("SELECT count(*) FROM tollhouse.service_api_keys")
        assert await cur.fetchone() == (0,)


async def test_check_server_accepts_the_test_server(dsn: str) -> None:
    info = await check_server(dsn)
    assert info.fsync
    assert info.version_num >= 150000


async def test_synchronous_commit_off_is_a_warning(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        dbname = conn.info.dbname
        conn.execute(f"ALTER DATABASE {dbname} SET synchronous_commit = off")
    with capture_logs() as logs:
        info = await check_server(dsn)
    assert info.synchronous_commit == "off"
    assert any(entry["event"] == "synchronous_commit_off" for entry in logs)


async def test_fsync_off_is_refused(admin_dsn: str, dsn: str) -> None:
    if not admin_dsn.startswith("postgresql://postgres:@/"):
        pytest.skip("changes a server-wide setting: only on the embedded test server")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET fsync = off")
        conn.execute("SELECT pg_reload_conf()")
        try:
            await asyncio.sleep(0.2)
            with pytest.raises(UnsafeDatabaseSettings, match="fsync=off"):
                await check_server(dsn)
        finally:
            conn.execute("ALTER SYSTEM RESET fsync")
            conn.execute("SELECT pg_reload_conf()")


async def test_unreachable_server_is_one_clear_error() -> None:
    with pytest.raises(
        DatabaseUnavailable, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:1/"
    ):
        await check_server("postgresql://nobody@127.0.0.1:1/nothing")


async def test_pooled_connections_never_mix_up_acting_users(service_dsn: str) -> None:
    """R-05 in small: 400 end-user transactions of 40 users over 4 pooled connections; each
    sees exactly its own acting user, and the service sees none afterwards."""
    users = [uuid.uuid4() for _ in range(40)]
    async with Tollhouse.open(service_dsn, min_size=4, max_size=4) as tollhouse:

        async def as_user(user: uuid.UUID) -> tuple[uuid.UUID, tuple[str, uuid.UUID | None]]:
            async with tollhouse.db.as_end_user(user) as conn:
                await asyncio.sleep(0)  # let other transactions interleave
                return user, await _whoami(conn)

        results = await asyncio.gather(*(as_user(users[i % 40]) for i in range(400)))
        assert all(seen == ("tollhouse_user", user) for user, seen in results)
        for _ in range(4):
            async with tollhouse.db.connection() as conn:
                assert await _whoami(conn) == ("tollhouse_service", None)


async def test_the_service_login_is_not_a_superuser(service_dsn: str, admin_dsn: str) -> None:
    if os.environ.get("DATABASE_URL"):
        pytest.skip("with an external DATABASE_URL the login is the operator's choice")
    async with (
        Tollhouse.open(service_dsn, min_size=1, max_size=1) as tollhouse,
        tollhouse.db.as_end_user(uuid.uuid4()) as conn,
    ):
        await conn.execute("RESET ROLE")  # what an injected statement could try
        cur = await conn.execute("SELECT current_user, current_setting('is_superuser')")
        assert await cur.fetchone() == ("tollhouse_service", "off")


async def test_a_pool_on_an_unmigrated_database_is_refused(empty_dsn: str) -> None:
    """Connections opened before the roles exist would act as the login role: refused."""
    with pytest.raises(MigrationsPending, match="tollhouse migrate"):
        async with Tollhouse.open(empty_dsn, min_size=1, max_size=1):
            pass


def _sql_texts(path: Path) -> list[str]:
    """The SQL a file can send: a .sql file whole, a .py file's string literals (not its
    docstrings or comments)."""
    text = path.read_text()
    if path.suffix == ".sql":
        return [text]
    tree = ast.parse(text)
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_session_level_settings_outside_the_pool_setup() -> None:
    """A session-level SET would leak into the next user of a pooled connection."""
    root = Path(tollhouse_package.__file__).parent
    # SET ROLE / SET SESSION ... / SET some.custom_setting, or set_config(..., false).
    pattern = re.compile(
        r"(?i)\bSET\s+(?:SESSION\s+)?(?:ROLE\b|AUTHORIZATION\b|\w+\.\w+)"
        r"|set_config\([^)]*,\s*false\)"
    )
    offenders = [
        f"{path.relative_to(root)}: {match.group(0)}"
        for path in sorted(root.rglob("*"))
        if path.suffix in {".py", ".sql"} and "migrations" not in path.parts
        for text in _sql_texts(path)
        for match in pattern.finditer(text)
    ]
    assert offenders == [
        "db/pool.py: set_config('TimeZone', 'UTC', false)",  # SESSION_SETTINGS
        "db/pool.py: set_config('DateStyle', 'ISO, MDY', false)",
        "db/pool.py: set_config('IntervalStyle', 'postgres', false)",
        "db/pool.py: set_config('role', %s, false)",
    ]


NASTY_TEXT = [
    *("", "NULL", "null", "a,b", "{x}", 'quote"d', "back\\slash", "\\", '"'),
    *("uni ☃ é", " spaced ", "new\nline", "tab\there", "astral 😀 𝄞"),
]


async def test_array_literals_reach_postgresql_unchanged(tollhouse: Tollhouse) -> None:
    """The batch calls' hand-built array literals (tollhouse.db.arrays) read back exactly:
    strings that look like NULL, braces, commas, quotes, backslashes; NULL elements."""
    texts: list[str | None] = [*NASTY_TEXT, None]
    ids: list[uuid.UUID | None] = [uuid.uuid4(), None, uuid.uuid4()]
    ints = [0, -1, 10**15, 7]
    docs: list[dict[str, object] | None] = [
        {},
        None,
        {"k": 'v"\\', "n": [1, {"deep": "☃"}], "NULL": None, "a,b": "{}"},
        {"prompt": "x" * 300},
    ]
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT %s::text[], %s::uuid[], %s::bigint[], %s::jsonb[]",
            (text_array(texts), uuid_array(ids), int_array(ints), jsonb_array(docs)),
        )
        row = await cur.fetchone()
    assert row is not None
    assert row[0] == texts
    assert row[1] == ids
    assert row[2] == ints
    assert row[3] == docs
    assert text_array([]) == uuid_array([]) == int_array([]) == jsonb_array([]) == "{}"


@pytest.mark.parametrize(
    ("build", "values"),
    [
        (uuid_array, [str(uuid.uuid4())]),
        (uuid_array, ["a,b"]),
        (int_array, [True]),
        (int_array, [1.5]),
        (int_array, ["7"]),
        (jsonb_array, [{"x": float("nan")}]),
    ],
)
def test_array_literals_refuse_what_they_cannot_spell_exactly(
    build: Callable[[list[Any]], str], values: list[Any]
) -> None:
    """A value of the wrong type is refused, not spelled into the literal where PostgreSQL
    would read something else (a bool as 1, a string with a comma as two elements)."""
    with pytest.raises((TypeError, ValueError)):
        build(values)
