"""Readiness and the operator's `doctor` checks.

Later domains add their own checks (the credits conservation check, for one) by passing
more `DoctorCheck` callables to `HealthService`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tollhouse.db import migrate
from tollhouse.db.pool import Conn, Database, check_server, connect
from tollhouse.db.queries import Queries
from tollhouse.db.roles import END_USER_ROLE, SCHEMA, SERVICE_ROLE
from tollhouse.errors import TollhouseError

_queries = Queries("tollhouse.health", "queries.sql")

#: Tables exempt from the forced-RLS rule: bookkeeping that holds no user's data.
RLS_EXEMPT_TABLES = ("schema_migrations",)


@dataclass(frozen=True)
class Readiness:
    """Whether the service can serve traffic, and why not."""

    ready: bool
    database: bool
    migrations: bool
    detail: str


@dataclass(frozen=True)
class Check:
    """One doctor check's outcome."""

    name: str
    ok: bool
    detail: str


DoctorCheck = Callable[[Conn], Awaitable[Check]]


class HealthService:
    """Answers /readyz and runs `tollhouse doctor`."""

    def __init__(
        self,
        db: Database,
        extra_checks: Sequence[DoctorCheck] = (),
        *,
        runtime_dsn: str | None = None,
    ) -> None:
        self._db = db
        self._extra_checks = tuple(extra_checks)
        self._runtime_dsn = runtime_dsn

    async def readiness(self) -> Readiness:
        """Ready when the database answers and every migration is applied unchanged."""
        try:
            async with self._db.connection() as conn:
                await conn.execute(_queries["ping"])
                statuses = await migrate.status_on(conn)
        except TollhouseError as exc:
            return Readiness(False, False, False, exc.message)
        try:
            migrate.require_current(statuses)
        except TollhouseError as exc:
            return Readiness(False, True, False, exc.message)
        return Readiness(True, True, True, "ok")

    async def doctor(self) -> list[Check]:
        """Every check, run on a direct connection as the login role (it reads catalogs)."""
        checks: list[Check] = []
        try:
            info = await check_server(self._db.dsn)
            checks.append(
                Check(
                    "database",
                    True,
                    f"PostgreSQL {info.version}, fsync=on,"
                    f" synchronous_commit={info.synchronous_commit}",
                )
            )
        except TollhouseError as exc:
            return [Check("database", False, exc.message)]
        async with await connect(self._db.dsn) as conn:
            for check in (
                _migrations_check,
                _roles_check,
                _rls_check,
                _functions_check,
                *self._extra_checks,
            ):
                try:
                    checks.append(await check(conn))
                except TollhouseError as exc:
                    checks.append(Check(check.__name__.strip("_"), False, exc.message))
        checks.append(await self._runtime_check())
        return checks

    async def _runtime_check(self) -> Check:
        """What the running service's connections act as: never an owner or superuser."""
        try:
            async with await connect(self._runtime_dsn or self._db.dsn, as_service=True) as conn:
                cur = await conn.execute(_queries["runtime_role"])
                row = await cur.fetchone()
        except TollhouseError as exc:
            return Check("runtime", False, exc.message)
        assert row is not None
        acting, acting_super, acting_bypass, login, login_super = row
        if acting_super or acting_bypass:
            return Check("runtime", False, f"the service acts as {acting}, which bypasses RLS")
        detail = f"acts as {acting} (login {login})"
        if login_super:
            detail += "; the login is a superuser: set TOLLHOUSE_SERVICE_DATABASE_URL to a"
            detail += " tollhouse_service login for a hard boundary"
        return Check("runtime", True, detail)


async def _migrations_check(conn: Conn) -> Check:
    statuses = await migrate.status_on(conn)
    try:
        migrate.require_current(statuses)
    except TollhouseError as exc:
        return Check("migrations", False, exc.message)
    return Check("migrations", True, f"{len(statuses)} applied, none changed")


async def _roles_check(conn: Conn) -> Check:
    cur = await conn.execute(_queries["roles"], {"roles": [SERVICE_ROLE, END_USER_ROLE]})
    rows = await cur.fetchall()
    problems = [
        f"role {name} is missing"
        for name in (END_USER_ROLE, SERVICE_ROLE)
        if name not in {r[0] for r in rows}
    ]
    for name, superuser, bypass, owned in rows:
        if superuser:
            problems.append(f"role {name} is a superuser")
        if bypass:
            problems.append(f"role {name} can bypass RLS")
        if owned:
            problems.append(f"role {name} owns {owned} relation(s)")
    if problems:
        return Check("roles", False, "; ".join(problems))
    return Check("roles", True, f"{SERVICE_ROLE} and {END_USER_ROLE}: no bypass, own nothing")


async def _rls_check(conn: Conn) -> Check:
    cur = await conn.execute(
        _queries["tables_without_forced_rls"],
        {"schema": SCHEMA, "allowed": list(RLS_EXEMPT_TABLES)},
    )
    missing = [r[0] for r in await cur.fetchall()]
    if missing:
        return Check("rls", False, "RLS not enabled and forced on: " + ", ".join(missing))
    return Check("rls", True, "enabled and forced on every table")


async def _functions_check(conn: Conn) -> Check:
    cur = await conn.execute(_queries["unsafe_functions"], {"schema": SCHEMA})
    problems = []
    for name, unpinned, public_execute in await cur.fetchall():
        if unpinned:
            problems.append(f"{name} does not pin its search_path")
        if public_execute:
            problems.append(f"{name} is executable by PUBLIC")
    if problems:
        return Check("functions", False, "; ".join(problems))
    return Check("functions", True, "search_path pinned, no PUBLIC execute")
