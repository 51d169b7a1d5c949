"""Apply the package's numbered SQL migrations, forward only, with a checksum history.

Each `NNNN_name.sql` in `tollhouse.db.migrations` runs once, in its own transaction, and
is recorded in `tollhouse.schema_migrations` with the SHA-256 of its file. A migration
whose file changed after it was applied stops everything with an error naming the file.
Concurrent runners queue on an advisory lock, so two at once leave one history.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Literal, LiteralString

import psycopg

from tollhouse.db.errors import translate
from tollhouse.db.pool import Conn, connect
from tollhouse.db.queries import Queries
from tollhouse.errors import (
    MigrationChecksumMismatch,
    MigrationError,
    MigrationsPending,
    UnknownMigrationApplied,
)

MIGRATIONS_PACKAGE = "tollhouse.db.migrations"
_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_queries = Queries("tollhouse.db.sql", "migrations.sql")


@dataclass(frozen=True)
class Migration:
    """One migration file of the package."""

    version: int
    name: str
    filename: str
    sql: LiteralString

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class MigrationStatus:
    """A migration and where it stands in one database."""

    version: int
    name: str
    filename: str | None
    state: Literal["applied", "pending", "changed", "unknown"]
    applied_at: datetime | None


@functools.cache
def _load(package: str) -> tuple[Migration, ...]:
    return tuple(_read_migrations(package))


def load_migrations(package: str = MIGRATIONS_PACKAGE) -> list[Migration]:
    """The migrations shipped in `package`, in version order (read once per process)."""
    return list(_load(package))


def _read_migrations(package: str) -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files(package).iterdir():
        match = _FILENAME.match(entry.name)
        if match is None:
            continue
        text = entry.read_text("utf-8")
        found.append(Migration(int(match[1]), match[2], entry.name, text))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number in {package}")
    return found


async def _applied(conn: Conn) -> dict[int, tuple[str, str, datetime]]:
    cur = await conn.execute(_queries["history_exists"])
    row = await cur.fetchone()
    if row is None or not row[0]:
        return {}
    cur = await conn.execute(_queries["applied"])
    return {v: (name, checksum, at) for v, name, checksum, at in await cur.fetchall()}


def _compare(
    migrations: list[Migration], applied: dict[int, tuple[str, str, datetime]]
) -> list[MigrationStatus]:
    by_version = {m.version: m for m in migrations}
    statuses: list[MigrationStatus] = []
    for version in sorted(set(by_version) | set(applied)):
        migration = by_version.get(version)
        record = applied.get(version)
        if migration is None:
            assert record is not None
            statuses.append(MigrationStatus(version, record[0], None, "unknown", record[2]))
        elif record is None:
            statuses.append(
                MigrationStatus(version, migration.name, migration.filename, "pending", None)
            )
        else:
            state: Literal["applied", "changed"] = (
                "applied" if record[1] == migration.checksum else "changed"
            )
            statuses.append(
                MigrationStatus(version, migration.name, migration.filename, state, record[2])
            )
    return statuses


def _raise_for_history(statuses: list[MigrationStatus]) -> None:
    for status in statuses:
        if status.state == "changed":
            raise MigrationChecksumMismatch(
                f"migration {status.filename} was changed after it was applied;"
                " restore the original file and add a new migration instead",
                filename=status.filename,
                version=status.version,
            )
        if status.state == "unknown":
            raise UnknownMigrationApplied(
                f"the database has migration {status.version:04d}_{status.name}, which this"
                " version of Tollhouse does not ship; upgrade Tollhouse",
                version=status.version,
            )


async def status_on(conn: Conn, migrations: list[Migration] | None = None) -> list[MigrationStatus]:
    """Every migration and its state, read through an open connection."""
    migrations = load_migrations() if migrations is None else migrations
    return _compare(migrations, await _applied(conn))


async def status(dsn: str, migrations: list[Migration] | None = None) -> list[MigrationStatus]:
    """Every migration and its state in the database at `dsn`."""
    async with await connect(dsn) as conn:
        return await status_on(conn, migrations)


async def verify(dsn: str, migrations: list[Migration] | None = None) -> list[MigrationStatus]:
    """Raise unless every applied migration matches its file; return the statuses."""
    statuses = await status(dsn, migrations)
    _raise_for_history(statuses)
    return statuses


def require_current(statuses: list[MigrationStatus]) -> None:
    """Raise unless every migration is applied and unchanged."""
    _raise_for_history(statuses)
    pending = [s.filename for s in statuses if s.state == "pending"]
    if pending:
        raise MigrationsPending(
            f"{len(pending)} migration(s) not applied: run 'tollhouse migrate'", pending=pending
        )


async def migrate(dsn: str, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply every pending migration; return the ones this call applied."""
    migrations = load_migrations() if migrations is None else migrations
    done: list[Migration] = []
    async with await connect(dsn) as conn:
        try:
            await conn.execute(_queries["lock"])
            try:
                await conn.execute(_queries["bootstrap"])
                applied = await _applied(conn)
                _raise_for_history(_compare(migrations, applied))
                for migration in migrations:
                    if migration.version in applied:
                        continue
                    await _apply(conn, migration)
                    done.append(migration)
            finally:
                await conn.execute(_queries["unlock"])
        except psycopg.Error as exc:
            raise translate(exc) from exc
    return done


async def _apply(conn: Conn, migration: Migration) -> None:
    started = time.perf_counter()
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                _queries["record"],
                {
                    "version": migration.version,
                    "name": migration.name,
                    "checksum": migration.checksum,
                    "duration_ms": int((time.perf_counter() - started) * 1000),
                },
            )
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MigrationError(
            f"migration {migration.filename} failed: {first}", filename=migration.filename
        ) from exc
