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
from tollhouse.db.roles import ACTING_USER_SETTING, END_USER_ROLE, SCHEMA, SERVICE_ROLE
from tollhouse.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    MigrationsPending,
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


#: The session settings every connection of ours sets when it opens (docs/decisions.md):
#: counting in UTC whatever the server's zone, and the only DateStyle and IntervalStyle
#: psycopg reads timestamps and intervals in (PostgreSQL's defaults).
SESSION_SETTINGS = (
    "set_config('TimeZone', 'UTC', false), set_config('DateStyle', 'ISO, MDY', false),"
    " set_config('IntervalStyle', 'postgres', false)"
)


async def connect(dsn: str, *, timeout: float = 10.0, as_service: bool = False) -> Conn:
    """One autocommit connection with our session settings (`SESSION_SETTINGS`), with a
    one-line error when the server is unreachable; `as_service`: configured as the pool's
    are (`configure_connection`, which sets them in the same statement)."""
    try:
        conn = await AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=max(1, int(timeout))
        )
    except psycopg.OperationalError as exc:
        reason = _connect_reason(exc)
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe(dsn)}: {reason}"
        ) from exc
    try:
        if as_service:
            await configure_connection(conn)
        else:
            await conn.execute("SELECT " + SESSION_SETTINGS)
    except BaseException:
        await conn.close()
        raise
    return conn


def _connect_reason(exc: BaseException) -> str:
    """libpq's cause ("Connection refused"), not its closing hint."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return "no answer"
    first = lines[0]
    return first.rsplit("failed: ", 1)[-1] if "failed: " in first else first


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


async def configure_connection(conn: Conn) -> None:
    """Make a new connection act as the service role, or refuse it.

    The service never acts as the owner of the tables (owners and superusers bypass RLS).
    Logged in as `tollhouse_service` there is nothing to do; logged in as another role it
    switches with `SET ROLE`. Before migration 0001 (no role, no schema): refused.

    It takes `SESSION_SETTINGS` in the same statement: its time zone is UTC, whatever the
    server's default, so dates and months are counted (`interval '1 month'`, `::date`) and
    timestamps written as text the same way on every server and for every operator's
    `PGTZ`; its DateStyle is ISO and its IntervalStyle `postgres` (PostgreSQL's defaults),
    the only ones psycopg reads timestamps with a time zone and intervals in: a server or
    role set to others made every such read fail.
    """
    cur = await conn.execute(
        "SELECT current_user = %s, to_regrole(%s) IS NOT NULL AND to_regnamespace(%s) IS NOT NULL, "
        + SESSION_SETTINGS,
        (SERVICE_ROLE, SERVICE_ROLE, SCHEMA),
    )
    row = await cur.fetchone()
    assert row is not None
    if row[0]:
        return
    if not row[1]:
        raise MigrationsPending("the database has no Tollhouse schema yet: run 'tollhouse migrate'")
    await conn.execute("SELECT set_config('role', %s, false)", (SERVICE_ROLE,))


class Database:
    """The pool, plus helpers that run work in transactions the right way."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout: float = 5.0,
        name: str = "tollhouse",
    ) -> None:
        self.dsn = dsn
        self.name = name
        self._timeout = timeout
        self._closed = False
        self._lanes: list[Database] = []
        # For the pools of `lanes`: opened on first use, closed with their parent.
        self._parent: Database | None = None
        self._open_lock: asyncio.Lock | None = None
        # No per-checkout check or reset: each costs a round trip on the hot path (about
        # 40%). Session state is never set outside `SESSION_SETTINGS` and
        # `configure_connection` (a test greps for it), and a broken connection is replaced
        # after its error.
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            name=name,
            kwargs={"autocommit": True},
            configure=configure_connection,
            timeout=timeout,
            max_idle=300,
        )

    async def open(self, timeout: float = 10.0) -> None:
        """Open the pool and wait until its first connections are ready."""
        # One direct connection first, so a refusal reads as its real cause.
        async with await connect(self.dsn, timeout=timeout, as_service=True):
            pass
        try:
            await self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            await self._pool.close()
            raise DatabaseUnavailable(
                f"cannot open connections to PostgreSQL at {describe(self.dsn)}"
            ) from exc

    async def close(self) -> None:
        """Close every connection, the lanes' too. Nothing opens again afterwards."""
        self._closed = True
        for lanes in list(self._lanes):
            await lanes.close()
        lock = self._open_lock
        if lock is not None:
            async with lock:  # an opening under way finishes first, then is closed
                self._open_lock = None
        await self._pool.close()
        if self._parent is not None and self in self._parent._lanes:
            self._parent._lanes.remove(self)

    def lanes(self, size: int, name: str) -> Database:
        """A pool of `size` connections of its own, for the lanes of a group commit
        (`tollhouse.db.group_commit`): opened on first use, closed with this one (or on its
        own, by the service that asked for it).

        The main pool hands out its idle connections in turn, so calls of the batch function
        would visit every one of them: each connection compiles the function and plans its
        statements on its first call (tens of milliseconds, a p99 spike for each), and each
        call finds its backend's caches cold. A batcher's own few connections stay warm: the
        pool keeps all `size` open once used (no idle timeout below its minimum)."""
        if self._closed:
            raise DatabaseUnavailable("the connection pool is closed")
        lanes = Database(
            self.dsn,
            min_size=size,
            max_size=size,
            timeout=self._timeout,
            name=f"{self.name}-{name}",
        )
        lanes._parent = self
        lanes._open_lock = asyncio.Lock()
        self._lanes.append(lanes)
        return lanes

    @property
    def is_open(self) -> bool:
        """Whether the pool is open (a lanes pool opens on its first use)."""
        return not self._pool.closed

    def lanes_stats(self) -> dict[str, dict[str, int]]:
        """Each lanes pool's figures, by name, for /metrics. psycopg_pool counts a pool's
        minimum as its size before it opens; a lanes pool not yet used has no connection."""
        return {
            lanes.name: lanes.stats() if lanes.is_open else {**lanes.stats(), "pool_size": 0}
            for lanes in self._lanes
        }

    async def _opened(self) -> None:
        """Open a lanes pool on its first use (its connections come up in the background)."""
        lock = self._open_lock
        if lock is None:
            return
        async with lock:
            if self._closed:
                raise DatabaseUnavailable("the connection pool is closed")
            if self._open_lock is not None:
                await self._pool.open(wait=False)
                self._open_lock = None

    def stats(self) -> dict[str, int]:
        """Pool figures for /metrics (psycopg_pool's names)."""
        return self._pool.get_stats()

    @asynccontextmanager
    async def connection(self, constraints: ConstraintMap | None = None) -> AsyncIterator[Conn]:
        """An autocommit connection; driver errors come out as Tollhouse errors."""
        if self._open_lock is not None:
            await self._opened()
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

        async def in_transaction(conn: Conn) -> T:
            async with conn.transaction():
                if isolation != "read committed":
                    await conn.execute(_ISOLATION_SQL[isolation])
                return await work(conn)

        return await self.retrying(in_transaction, attempts=attempts, constraints=constraints)

    async def retrying(
        self,
        work: Callable[[Conn], Awaitable[T]],
        *,
        attempts: int = 5,
        constraints: ConstraintMap | None = None,
    ) -> T:
        """Run `work` on an autocommit connection, again on a serialization failure or
        deadlock, at most `attempts` times. For one statement that is its own transaction
        (one round trip, no BEGIN or COMMIT), such as a batch function's call."""
        if self._open_lock is not None:
            await self._opened()
        for attempt in range(1, attempts + 1):
            try:
                async with self._pool.connection() as conn:
                    return await work(conn)
            except PoolTimeout as exc:  # a psycopg.OperationalError: catch it first
                raise DatabaseUnavailable("no database connection became free in time") from exc
            except psycopg.Error as exc:
                if exc.sqlstate not in RETRYABLE_SQLSTATES:
                    raise translate(exc, constraints) from exc
                log.info("transaction_retry", sqlstate=exc.sqlstate, attempt=attempt)
                if attempt == attempts:
                    raise SerializationRetriesExhausted(attempts=attempts) from exc
                # Full jitter, so that the transactions that collided do not collide again.
                await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311
        raise AssertionError("unreachable")  # pragma: no cover

    @asynccontextmanager
    async def as_end_user(
        self, user_id: uuid.UUID, constraints: ConstraintMap | None = None
    ) -> AsyncIterator[Conn]:
        """A transaction that runs as the end-user role with `user_id` as the acting user.

        Both the role and the setting are transaction-local (`SET LOCAL`, `set_config(...,
        true)`), so the pooled connection carries neither into its next transaction.
        """
        if self._open_lock is not None:
            await self._opened()
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
