"""Row-level security of the identity tables: an end user sees and changes only its own
rows (RELIABILITY R-03/R-04), and the matrix catches a loosened policy (R-09)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import errors as pg
from psycopg import sql

from tests.integration.test_rls_orgs import ORG_POLICIES
from tests.support.flows import verified_account
from tests.support.idp import KeySet, claims, sign
from tollhouse.app import Tollhouse
from tollhouse.db.pool import Conn

#: Every identity table and the expression naming the user who owns a row.
OWNERS = {
    "users": "id",
    "user_emails": "user_id",
    "email_routes": "user_id",
    "user_identities": "user_id",
    "identity_routes": "user_id",
    "user_roles": "user_id",
    "user_email_preferences": "user_id",
    "sessions": "user_id",
    "user_tokens": "user_id",
    "identity_events": "user_id",
    "tenants": "owner_user_id",
    "tenant_members": "user_id",
    "oidc_nonces": "NULL::uuid",
    "signin_attempts": "NULL::uuid",
}


#: Tables an end user may update, with a column it may set and a constant to set it to (a
#: constant: reading the column would bring the SELECT policy in and hide the UPDATE one).
UPDATABLE = {"users": ("display_name", "'probe'"), "user_email_preferences": ("marketing", "false")}

#: Every end-user policy of the identity tables, and the command it covers.
POLICIES = {
    ("users", "users_self_read"): "read",
    ("users", "users_self_update"): "update",
    ("user_emails", "user_emails_self_read"): "read",
    ("user_identities", "user_identities_self_read"): "read",
    ("user_roles", "user_roles_self_read"): "read",
    ("user_email_preferences", "user_email_preferences_self_read"): "read",
    ("user_email_preferences", "user_email_preferences_self_update"): "update",
    ("sessions", "sessions_self_read"): "read",
    ("tenants", "tenants_member_read"): "read",
    ("tenant_members", "tenant_members_self_read"): "read",
}


async def _denied_or(conn: Conn, query: sql.SQL | sql.Composed, params: dict[str, object]) -> int:
    """Rows the statement saw or touched (then rolled back); 0 when refused outright."""
    try:
        async with conn.transaction(force_rollback=True):
            cur = await conn.execute(query, params)
            if cur.description is not None:
                row = await cur.fetchone()
                return int(row[0]) if row else 0
            return int(cur.rowcount)
    except (pg.InsufficientPrivilege, pg.CheckViolation):
        return 0


async def leaks(tollhouse: Tollhouse, me: uuid.UUID, other: uuid.UUID) -> list[str]:
    """Everything `me`, acting as the end-user role, can see or change of `other`'s."""
    found: list[str] = []
    async with tollhouse.db.as_end_user(me) as conn:
        for table, owner in OWNERS.items():
            t = sql.Identifier("tollhouse", table)
            o = sql.SQL(owner)
            checks = {
                "read": sql.SQL("SELECT count(*) FROM {} WHERE {} IS DISTINCT FROM %(me)s").format(
                    t, o
                ),
                "update": sql.SQL("UPDATE {} SET {} = {} WHERE {} = %(other)s").format(t, o, o, o)
                if owner != "NULL::uuid"
                else None,
                "delete": sql.SQL("DELETE FROM {} WHERE {} IS DISTINCT FROM %(me)s").format(t, o),
            }
            for action, query in checks.items():
                if query is None:
                    continue
                touched = await _denied_or(conn, query, {"me": me, "other": other})
                if touched:
                    found.append(f"{action} {table}: {touched} row(s) of another user")
        # Updates with no WHERE clause: only the UPDATE policy stands between the statement and
        # every row. Anything beyond one's own rows is a leak.
        for table, (column, value) in UPDATABLE.items():
            t = sql.Identifier("tollhouse", table)
            c = sql.Identifier(column)
            own = await _denied_or(
                conn,
                sql.SQL("SELECT count(*) FROM {} WHERE {} = %(me)s").format(
                    t, sql.SQL(OWNERS[table])
                ),
                {"me": me},
            )
            update = sql.SQL("UPDATE {} SET {} = " + value).format(t, c)
            touched = await _denied_or(conn, update, {})
            if touched > own:
                found.append(f"update {table}: {touched - own} row(s) of another user")
        if await _denied_or(conn, sql.SQL("SELECT count(password_hash) FROM tollhouse.users"), {}):
            found.append("read users.password_hash")
        # Writing rows in the other user's name, or moving one's own row to them.
        for label, statement in {
            "insert users": "INSERT INTO tollhouse.users (id) VALUES (%(other)s)",
            "insert user_emails": "INSERT INTO tollhouse.user_emails (user_id, email, via)"
            " VALUES (%(other)s, 'x@example.com', 'admin')",
            "insert user_roles": "INSERT INTO tollhouse.user_roles VALUES (%(me)s, 'superuser')",
            "move own user row": "UPDATE tollhouse.users SET id = %(other)s WHERE id = %(me)s",
            "raise own status": "UPDATE tollhouse.users SET plan_override = 'power'"
            " WHERE id = %(me)s",
        }.items():
            if await _denied_or(conn, sql.SQL(statement), {"me": me, "other": other}):
                found.append(label)
    return found


@pytest.fixture
async def two_users(tollhouse: Tollhouse, idp_keys: KeySet) -> tuple[uuid.UUID, uuid.UUID]:
    ids = []
    for name in ("a", "b"):
        sign_in, session = await verified_account(tollhouse, f"{name}@example.com")
        await tollhouse.auth.link_identity(
            session, "google", sign(idp_keys, claims("google", f"sub-{name}"))
        )
        await tollhouse.auth.request_password_reset(f"{name}@example.com")
        ids.append(sign_in.user.id)
    return ids[0], ids[1]


async def test_no_user_sees_or_changes_another_users_identity_rows(
    tollhouse: Tollhouse, two_users: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_users
    assert await leaks(tollhouse, a, b) == []
    assert await leaks(tollhouse, b, a) == []


async def test_a_user_reads_its_own_rows(
    tollhouse: Tollhouse, two_users: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, _ = two_users
    async with tollhouse.db.as_end_user(a) as conn:
        for table in (
            "users",
            "user_emails",
            "user_identities",
            "user_roles",
            "user_email_preferences",
            "sessions",
            "tenants",
            "tenant_members",
        ):
            owner = sql.SQL(OWNERS[table])
            query = sql.SQL("SELECT count(*) FROM {} WHERE {} = %(me)s").format(
                sql.Identifier("tollhouse", table), owner
            )
            cur = await conn.execute(query, {"me": a})
            row = await cur.fetchone()
            assert row is not None and row[0] >= 1, table


async def test_without_an_acting_user_nothing_is_visible(
    tollhouse: Tollhouse, two_users: tuple[uuid.UUID, uuid.UUID]
) -> None:
    """R-04: the end-user role with no acting user set sees no row at all."""
    async with tollhouse.db.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE tollhouse_user")
        for table in ("users", "user_emails", "user_identities", "sessions", "tenants"):
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("tollhouse", table))
            )
            assert await cur.fetchone() == (0,), table


def test_every_end_user_policy_is_in_the_mutation_list(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename, policyname FROM pg_policies"
            " WHERE schemaname = 'tollhouse' AND 'tollhouse_user' = ANY(roles)"
            " AND tablename = ANY(%s)",
            (list(OWNERS),),
        ).fetchall()
    # The organisations' policies on tenants and members have a matrix of their own.
    org_policies = {key for key in ORG_POLICIES if key[0] in OWNERS}
    assert {(t, p) for t, p in rows} == set(POLICIES) | org_policies


@pytest.mark.parametrize(("table", "policy"), list(POLICIES))
async def test_the_matrix_catches_a_loosened_policy(
    dsn: str,
    tollhouse: Tollhouse,
    two_users: tuple[uuid.UUID, uuid.UUID],
    table: str,
    policy: str,
) -> None:
    """Mutation check (R-09): loosen each policy on purpose; the matrix must report it."""
    loosen = (
        "USING (true)"
        if POLICIES[(table, policy)] == "read"
        else ("USING (true) WITH CHECK (true)")
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER POLICY {} ON {} " + loosen).format(
                sql.Identifier(policy), sql.Identifier("tollhouse", table)
            )
        )
    a, b = two_users
    action = POLICIES[(table, policy)]
    assert any(leak.startswith(f"{action} {table}:") for leak in await leaks(tollhouse, a, b))
