"""Row-level security over two organisations: no cross-organisation reads or writes, and
within one organisation only owners and admins manage (issue 6). Every policy is loosened in
turn to show the matrix notices."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import errors as pg
from psycopg import sql

from tollhouse.app import Tollhouse
from tollhouse.db.pool import Conn

#: Every end-user policy the organisations issue added, and what it covers.
ORG_POLICIES = {
    ("tenant_members", "tenant_members_member_read"): "read",
    ("tenant_members", "tenant_members_manage"): "update",
    ("tenant_members", "tenant_members_remove"): "delete",
    ("tenants", "tenants_manage"): "update",
    ("tenant_member_credit_limits", "tenant_member_credit_limits_read"): "read",
    ("tenant_member_credit_limits", "tenant_member_credit_limits_manage"): "update",
    ("tenant_invitations", "tenant_invitations_manage_read"): "read",
    ("tenant_invitations", "tenant_invitations_manage"): "update",
}

#: Probes of one organisation's rows: (table, action, statement).
PROBES = [
    ("tenants", "read", "SELECT count(*) FROM tollhouse.tenants WHERE id = %(org)s"),
    ("tenants", "update", "UPDATE tollhouse.tenants SET name = 'x' WHERE id = %(org)s"),
    (
        "tenant_members",
        "read",
        "SELECT count(*) FROM tollhouse.tenant_members WHERE tenant_id = %(org)s",
    ),
    (
        "tenant_members",
        "update",
        "UPDATE tollhouse.tenant_members SET role = 'admin'"
        " WHERE tenant_id = %(org)s AND role = 'member'",
    ),
    (
        "tenant_members",
        "delete",
        "DELETE FROM tollhouse.tenant_members WHERE tenant_id = %(org)s AND role <> 'owner'"
        " AND user_id <> tollhouse.current_user_id()",
    ),
    (
        "tenant_member_credit_limits",
        "read",
        "SELECT count(*) FROM tollhouse.tenant_member_credit_limits WHERE tenant_id = %(org)s",
    ),
    (
        "tenant_member_credit_limits",
        "update",
        "UPDATE tollhouse.tenant_member_credit_limits SET credit_limit = 5"
        " WHERE tenant_id = %(org)s",
    ),
    (
        "tenant_invitations",
        "read",
        "SELECT count(*) FROM tollhouse.tenant_invitations WHERE tenant_id = %(org)s",
    ),
    (
        "tenant_invitations",
        "update",
        "UPDATE tollhouse.tenant_invitations SET status = 'revoked' WHERE tenant_id = %(org)s",
    ),
    # Owners' rows: only an owner may touch them (and the last owner cannot step down).
    (
        "tenant_members",
        "update owner",
        "UPDATE tollhouse.tenant_members SET role = 'member'"
        " WHERE tenant_id = %(org)s AND role = 'owner'",
    ),
    (
        "tenant_members",
        "delete owner",
        "DELETE FROM tollhouse.tenant_members WHERE tenant_id = %(org)s AND role = 'owner'",
    ),
    (
        "tenant_member_credit_limits",
        "update owner",
        "UPDATE tollhouse.tenant_member_credit_limits l SET credit_limit = 5"
        " WHERE l.tenant_id = %(org)s AND l.user_id = ("
        " SELECT owner_user_id FROM tollhouse.tenants WHERE id = %(org)s)",
    ),
    (
        "tenant_member_credit_limits",
        "update self",
        "UPDATE tollhouse.tenant_member_credit_limits SET credit_limit = -1"
        " WHERE tenant_id = %(org)s AND user_id = tollhouse.current_user_id()",
    ),
    # Nobody revives a used or revoked invitation.
    (
        "tenant_invitations",
        "revive",
        "UPDATE tollhouse.tenant_invitations SET status = 'pending'"
        " WHERE tenant_id = %(org)s AND status <> 'pending'",
    ),
    (
        "credit_accounts",
        "read",
        "SELECT count(*) FROM tollhouse.credit_accounts WHERE tenant_id = %(org)s",
    ),
    (
        "invitation_routes",
        "read",
        "SELECT count(*) FROM tollhouse.invitation_routes WHERE tenant_id = %(org)s",
    ),
]


@dataclass(frozen=True)
class World:
    orgs: dict[str, uuid.UUID]
    users: dict[str, uuid.UUID]  # "<org>-<role>"


async def _touched(conn: Conn, statement: str, org: uuid.UUID) -> int:
    try:
        async with conn.transaction(force_rollback=True):
            cur = await conn.execute(sql.SQL(statement), {"org": org})
            if cur.description is not None:
                row = await cur.fetchone()
                return int(row[0]) if row else 0
            return int(cur.rowcount)
    except (pg.InsufficientPrivilege, pg.CheckViolation):
        return 0


async def violations(tollhouse: Tollhouse, world: World) -> list[str]:
    """Every probe a user may not pass but did: any write or read of the other organisation,
    and any management write by a plain member of its own."""
    found = []
    for who, user_id in world.users.items():
        own, role = who.split("-")
        async with tollhouse.db.as_end_user(user_id) as conn:
            for name, org in world.orgs.items():
                for table, action, statement in PROBES:
                    touched = await _touched(conn, statement, org)
                    allowed = name == own and (
                        action == "read"
                        or (
                            role in ("owner", "admin")
                            and (action in ("update", "delete") or role == "owner")
                        )
                    )
                    if (table, role) == ("tenant_invitations", "member"):
                        allowed = False
                    if table == "invitation_routes" or action == "revive":
                        allowed = False
                    if action in ("update owner", "delete owner") and table == "tenant_members":
                        allowed = False  # the only owner: the trigger refuses even the owner
                    if action == "update self" and role != "owner":
                        allowed = False
                    if touched and not allowed:
                        found.append(f"{action} {table}: {who} on {name}")
            # With no WHERE clause only the UPDATE policy stands between the statement and
            # every row (a WHERE would bring the SELECT policy in): one organisation's
            # invitation at most, and only for its managers.
            touched = await _touched(
                conn, "UPDATE tollhouse.tenant_invitations SET status = 'revoked'", world.orgs[own]
            )
            if touched > (1 if role in ("owner", "admin") else 0):
                found.append(f"update tenant_invitations: {who} revoked {touched}")
    return found


@pytest.fixture
async def world(tollhouse: Tollhouse) -> World:
    users: dict[str, uuid.UUID] = {}
    orgs: dict[str, uuid.UUID] = {}
    for name in ("a", "b"):
        for role in ("owner", "admin", "member"):
            created = await tollhouse.users.create(email=f"{name}-{role}@example.com")
            users[f"{name}-{role}"] = created.id
        org = await tollhouse.orgs.create(name.upper(), f"org-{name}", users[f"{name}-owner"])
        orgs[name] = org.id
        await tollhouse.orgs.add_member(org.id, users[f"{name}-admin"], "admin")
        await tollhouse.orgs.add_member(org.id, users[f"{name}-member"], "member")
        await tollhouse.orgs.invite(org.id, f"new-{name}@example.com")
        gone = await tollhouse.orgs.invite(org.id, f"gone-{name}@example.com")
        await tollhouse.orgs.revoke(org.id, gone.invitation.id)
        await tollhouse.credits.balance(tenant_id=org.id)  # creates the account
    return World(orgs, users)


async def test_no_cross_organisation_reads_or_writes(tollhouse: Tollhouse, world: World) -> None:
    assert await violations(tollhouse, world) == []


async def test_members_read_their_organisation(tollhouse: Tollhouse, world: World) -> None:
    async with tollhouse.db.as_end_user(world.users["a-member"]) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM tollhouse.tenant_members WHERE tenant_id = %s",
            (world.orgs["a"],),
        )
        assert await cur.fetchone() == (3,)


def test_every_org_policy_is_probed(dsn: str) -> None:
    tables = sorted({t for t, _ in ORG_POLICIES} | {"invitation_routes"})
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename, policyname FROM pg_policies WHERE schemaname = 'tollhouse'"
            " AND 'tollhouse_user' = ANY(roles) AND tablename = ANY(%s)"
            " AND policyname <> ALL(%s)",
            (tables, ["tenants_member_read", "tenant_members_self_read"]),
        ).fetchall()
    assert {(t, p) for t, p in rows} == set(ORG_POLICIES)


@pytest.mark.parametrize(("table", "policy"), list(ORG_POLICIES))
async def test_the_matrix_catches_a_loosened_policy(
    dsn: str, tollhouse: Tollhouse, world: World, table: str, policy: str
) -> None:
    loosen = "USING (true)"
    if ORG_POLICIES[(table, policy)] == "update":
        loosen = "USING (true) WITH CHECK (true)"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER POLICY {} ON {} " + loosen).format(
                sql.Identifier(policy), sql.Identifier("tollhouse", table)
            )
        )
    action = ORG_POLICIES[(table, policy)]
    found = await violations(tollhouse, world)
    assert any(v.startswith(action) and f" {table}:" in v for v in found), found


@pytest.mark.parametrize(
    ("policy", "weaker", "caught"),
    [
        (
            "tenant_member_credit_limits_manage",
            "USING (tollhouse.acting_member_role(tenant_id) IN ('owner', 'admin'))",
            "update owner tenant_member_credit_limits",
        ),
        (
            "tenant_invitations_manage",
            "USING (tollhouse.acting_member_role(tenant_id) IN ('owner', 'admin'))"
            " WITH CHECK (true)",
            "revive tenant_invitations",
        ),
    ],
)
async def test_the_matrix_catches_a_dropped_clause(
    dsn: str, tollhouse: Tollhouse, world: World, policy: str, weaker: str, caught: str
) -> None:
    """Not just loosened to `true`: the matrix sees a policy that lost its owner or status
    clause."""
    table = caught.rsplit(" ", 1)[1]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER POLICY {} ON {} " + weaker).format(
                sql.Identifier(policy), sql.Identifier("tollhouse", table)
            )
        )
    action, _, table = caught.rpartition(" ")
    found = await violations(tollhouse, world)
    assert any(v.startswith(f"{action} {table}:") for v in found), found
