"""The async connection pool and the transaction helpers every service uses.

The pool's connections are in autocommit mode, so a one-statement call (the hot paths are
one PL/pgSQL function call) costs one round trip; `transaction` and `as_end_user` open
an explicit transaction where several statements must commit together.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tollhouse.db.dsn import describe
from tollhouse.db.errors import RETRYABLE_SQLSTATES, ConstraintMap, translate
from tollhouse.db.roles import ACTING_USER_SETTING, END_USER_ROLE, SERVICE_ROLE
from tollhouse.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    SerializationRetriesExhausted,
    UnsafeDatabaseSettings,
)

T = TypeVar("T")
Conn = AsyncConnection[Any]
Isolation = Literal["read committed", "repeatable read", "serializable"]

log = structlog.get_logger(__name__)

MIN_SERVER_VERSION = 150000
MAX_TESTED_SERVER_VERSION = 189999


@dataclass(frozen=True)
class ServerInfo:
    """What the service checks about its PostgreSQL server before it starts."""

    version_num: int
    version: str
    fsync: bool
    synchronous_commit: str


async def connect(dsn: str, *, timeout: float = 10.0) -> Conn:
    """One autocommit connection, with a one-line error when the server is unreachable."""
    try:
        return await AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=max(1, int(timeout))
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no answer"
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe(dsn)}: {reason}"
        ) from exc


async def check_server(dsn: str) -> ServerInfo:
    """Refuse servers that are too old or could lose committed money; warn on weaker ones."""
    async with await connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'),"
            " current_setting('fsync'), current_setting('synchronous_commit')"
        )
        row = await cur.fetchone()
    assert row is not None
    info = ServerInfo(row[0], row[1], row[2] == "on", row[3])
    if info.version_num < MIN_SERVER_VERSION:
        raise ConfigurationError(
            f"PostgreSQL {info.version} is too old; Tollhouse needs 15 or newer"
        )
    if info.version_num > MAX_TESTED_SERVER_VERSION:
        log.warning("postgres_version_untested", version=info.version)
    if not info.fsync:
        raise UnsafeDatabaseSettings(
            "the PostgreSQL server runs with fsync=off, so committed credits and payments could"
            " be lost in a crash; turn fsync on",
            setting="fsync",
        )
    if info.synchronous_commit == "off":
        log.warning(
            "synchronous_commit_off",
            message="synchronous_commit=off: the last transactions before a crash may be lost",
        )
    return info


class Database:
    """The pool, plus helpers that run work in transactions the right way."""

    def __init__(self, dsn: str, *, min_size: int = 2, max_size: int = 10) -> None:
        self.dsn = dsn
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            name="tollhouse",
            kwargs={"autocommit": True},
            configure=self._configure,
            check=AsyncConnectionPool.check_connection,
        )

    @staticmethod
    async def _configure(conn: Conn) -> None:
        # Act as the service role, never as the owner of the tables (which bypasses RLS).
        # Before the first migration the role does not exist yet; readyz reports that.
        cur = await conn.execute("SELECT to_regrole(%s) IS NOT NULL", (SERVICE_ROLE,))
        row = await cur.fetchone()
        if row is not None and row[0]:
            await conn.execute("SELECT set_config('role', %s, false)", (SERVICE_ROLE,))

    async def open(self, timeout: float = 10.0) -> None:
        """Open the pool and wait until its first connections are ready."""
        try:
            await self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            await self._pool.close()
            raise DatabaseUnavailable(
                f"cannot open connections to PostgreSQL at {describe(self.dsn)}"
            ) from exc

    async def close(self) -> None:
        """Close every connection."""
        await self._pool.close()

    def stats(self) -> dict[str, int]:
        """Pool figures for /metrics (psycopg_pool's names)."""
        return self._pool.get_stats()

    @asynccontextmanager
    async def connection(self, constraints: ConstraintMap | None = None) -> AsyncIterator[Conn]:
        """An autocommit connection; driver errors come out as Tollhouse errors."""
        try:
            async with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise DatabaseUnavailable("no database connection became free in time") from exc
        except psycopg.Error as exc:
            raise translate(exc, constraints) from exc

    async def transaction(
        self,
        work: Callable[[Conn], Awaitable[T]],
        *,
        isolation: Isolation = "read committed",
        attempts: int = 5,
        constraints: ConstraintMap | None = None,
    ) -> T:
        """Run `work` in one transaction, again from the start on a serialization failure
        or deadlock (SQLSTATE 40001 / 40P01), at most `attempts` times.

        `work` must be safe to repeat: it may run more than once, but only one run commits.
        """
        for attempt in range(1, attempts + 1):
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    if isolation != "read committed":
                        await conn.execute(_ISOLATION_SQL[isolation])
                    return await work(conn)
            except psycopg.Error as exc:
                if exc.sqlstate not in RETRYABLE_SQLSTATES:
                    raise translate(exc, constraints) from exc
                log.info("transaction_retry", sqlstate=exc.sqlstate, attempt=attempt)
                if attempt == attempts:
                    raise SerializationRetriesExhausted(attempts=attempts) from exc
                # Full jitter, so that the transactions that collided do not collide again.
                await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311
            except PoolTimeout as exc:
                raise DatabaseUnavailable("no database connection became free in time") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @asynccontextmanager
    async def as_end_user(
        self, user_id: uuid.UUID, constraints: ConstraintMap | None = None
    ) -> AsyncIterator[Conn]:
        """A transaction that runs as the end-user role with `user_id` as the acting user.

        Both the role and the setting are transaction-local (`SET LOCAL`, `set_config(...,
        true)`), so the pooled connection carries neither into its next transaction.
        """
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "SELECT set_config('role', %s, true), set_config(%s, %s, true)",
                    (END_USER_ROLE, ACTING_USER_SETTING, str(user_id)),
                )
                yield conn
        except PoolTimeout as exc:
            raise DatabaseUnavailable("no database connection became free in time") from exc
        except psycopg.Error as exc:
            raise translate(exc, constraints) from exc


_ISOLATION_SQL = {
    "repeatable read": "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "serializable": "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
}
