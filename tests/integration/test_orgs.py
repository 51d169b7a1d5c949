"""Organisations: lifecycle, members and roles, invitations, pooled credits with member
limits (issue 6; RELIABILITY O-01..O-05, T-01..T-05, T-07/T-08 for invitations)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from structlog.testing import capture_logs

from tests.support.dump import data_dump
from tests.support.locks import a_lock_wait
from tollhouse import errors as e
from tollhouse.app import Tollhouse
from tollhouse.credits import DebitRequest
from tollhouse.identity import IdentityConfig
from tollhouse.orgs import Organisation


async def user(
    tollhouse: Tollhouse, name: str | None = None, *, verified: bool = True
) -> uuid.UUID:
    email = f"{name or uuid.uuid4().hex[:10]}@example.com"
    return (await tollhouse.users.create(email=email, email_verified=verified)).id


async def org_with(
    tollhouse: Tollhouse, owner: uuid.UUID, *members: uuid.UUID, pool: int = 10_000
) -> Organisation:
    org = await tollhouse.orgs.create("Acme", f"acme-{uuid.uuid4().hex[:8]}", owner)
    for member in members:
        await tollhouse.orgs.add_member(org.id, member)
    await tollhouse.credits.grant(
        amount=pool, source="purchase", tenant_id=org.id, source_id="seed"
    )
    # No daily cap (the free plan's 100 credits of allowance stay in the pool).
    await tollhouse.db.transaction(
        lambda conn: conn.execute(
            "UPDATE tollhouse.credit_accounts SET daily_cap = NULL WHERE tenant_id = %s",
            (org.id,),
        )
    )
    return org


async def spend(
    tollhouse: Tollhouse, org: uuid.UUID, member: uuid.UUID, amount: int = 1, turn: str = ""
) -> str:
    """The outcome code of one member debit against the pool ('applied' when it went)."""
    result = await tollhouse.credits.debit(
        DebitRequest(amount=amount, turn_id=turn or uuid.uuid4().hex, tenant_id=org, user_id=member)
    )
    return result.code or result.status


@pytest.fixture
async def big(service_dsn: str, identity_config: IdentityConfig) -> AsyncIterator[Tollhouse]:
    """A Tollhouse with a pool large enough for 64 concurrent transactions."""
    async with Tollhouse.open(
        service_dsn, min_size=8, max_size=70, identity=identity_config
    ) as tollhouse:
        yield tollhouse


# --- lifecycle -------------------------------------------------------------------------------


async def test_create_rename_slug_delete_restore_and_list(tollhouse: Tollhouse) -> None:
    owner, other = await user(tollhouse), await user(tollhouse)
    org = await tollhouse.orgs.create("Acme", "acme", owner)
    assert (org.role, org.owner_user_id, org.is_default) == ("owner", owner, False)
    with pytest.raises(e.SlugTaken):
        await tollhouse.orgs.create("Other", "acme", other)
    renamed = await tollhouse.orgs.update(org.id, owner, name="Acme Inc", slug="acme-inc")
    assert (renamed.name, renamed.slug) == ("Acme Inc", "acme-inc")
    assert [o.id for o in await tollhouse.orgs.for_user(owner)] == [org.id]
    assert await tollhouse.orgs.for_user(other) == []
    with pytest.raises(e.OrganisationNotFound):  # a non-member does not see it at all
        await tollhouse.orgs.get(org.id, other)
    await tollhouse.orgs.delete(org.id, owner)
    assert await tollhouse.orgs.for_user(owner) == []
    with pytest.raises(e.OrganisationNotFound):
        await tollhouse.orgs.update(org.id, owner, name="x")
    assert (await tollhouse.orgs.restore(org.id, owner)).deleted_at is None


async def test_a_personal_tenant_cannot_be_deleted_or_get_members(tollhouse: Tollhouse) -> None:
    owner, other = await user(tollhouse), await user(tollhouse)
    personal = await tollhouse.credits.tenant_of(None, owner)
    with pytest.raises(e.PersonalTenant):
        await tollhouse.orgs.delete(personal, owner)
    with pytest.raises(e.PersonalTenant):
        await tollhouse.orgs.add_member(personal, other)
    with pytest.raises(e.PersonalTenant):
        await tollhouse.orgs.invite(personal, "x@example.com")
    # The database refuses it too, whoever writes.
    with pytest.raises(e.PersonalTenant):
        await tollhouse.db.transaction(
            lambda conn: conn.execute(
                "INSERT INTO tollhouse.tenant_members (tenant_id, user_id, role)"
                " VALUES (%s, %s, 'member')",
                (personal, other),
            ),
            constraints={"tenant_members_personal_check": e.PersonalTenant},
        )


async def test_deleted_organisation_spends_nothing(tollhouse: Tollhouse) -> None:
    owner = await user(tollhouse)
    org = await org_with(tollhouse, owner)
    await tollhouse.orgs.delete(org.id, owner)
    assert await spend(tollhouse, org.id, owner) == "not_found"
    await tollhouse.orgs.restore(org.id, owner)
    assert await spend(tollhouse, org.id, owner) == "applied"


# --- roles -----------------------------------------------------------------------------------


async def test_roles_decide_who_manages_whom(tollhouse: Tollhouse) -> None:
    owner, admin, member, newcomer = [await user(tollhouse) for _ in range(4)]
    org = await org_with(tollhouse, owner, admin, member)
    await tollhouse.orgs.change_role(org.id, admin, "admin", owner)
    with pytest.raises(e.OrganisationPermissionDenied):
        await tollhouse.orgs.add_member(org.id, newcomer, "member", member)
    with pytest.raises(e.OrganisationPermissionDenied):  # admins do not make owners
        await tollhouse.orgs.change_role(org.id, member, "owner", admin)
    with pytest.raises(e.OrganisationPermissionDenied):  # nor touch them
        await tollhouse.orgs.remove_member(org.id, owner, admin)
    await tollhouse.orgs.add_member(org.id, newcomer, "member", admin)
    await tollhouse.orgs.remove_member(org.id, newcomer, newcomer)  # anyone may leave
    with pytest.raises(e.LastOwner):
        await tollhouse.orgs.remove_member(org.id, owner, owner)
    transferred = await tollhouse.orgs.transfer_ownership(org.id, member, owner)
    assert transferred.owner_user_id == member
    roles = {m.user_id: m.role for m in await tollhouse.orgs.members(org.id)}
    assert roles == {owner: "admin", admin: "admin", member: "owner"}


@pytest.mark.parametrize("naive", [False, True], ids=["in-transaction", "naive-control"])
async def test_o03_a_demoted_admin_is_refused_even_mid_flight(
    tollhouse: Tollhouse, naive: bool
) -> None:
    """O-03: authorization is read after the organisation's lock, in the writing
    transaction: a demotion that commits while the admin's request waits is seen. The naive
    control reads the role first (from a cached or earlier read) and lets all three through."""
    owner, admin, member = [await user(tollhouse) for _ in range(3)]
    org = await org_with(tollhouse, owner, admin, member)
    await tollhouse.orgs.change_role(org.id, admin, "admin", owner)

    async def as_admin(action: Callable[[uuid.UUID | None], Awaitable[object]]) -> object:
        if naive:
            roles = {m.user_id: m.role for m in await tollhouse.orgs.members(org.id)}
            if roles.get(admin) not in ("owner", "admin"):
                raise e.OrganisationPermissionDenied()
            return await action(None)  # checked already: the write goes as the service
        return await action(admin)

    async with tollhouse.db.connection() as conn, conn.transaction():
        await conn.execute(
            "UPDATE tollhouse.tenant_members SET role = 'member'"
            " WHERE tenant_id = %s AND user_id = %s",
            (org.id, admin),
        )
        # The demotion holds the organisation: the admin's actions wait for it.
        await conn.execute(
            "SELECT 1 FROM tollhouse.tenants WHERE id = %s FOR NO KEY UPDATE", (org.id,)
        )
        attempts = [
            asyncio.create_task(
                as_admin(lambda a: tollhouse.orgs.invite(org.id, "z@example.com", actor=a))
            ),
            asyncio.create_task(
                as_admin(lambda a: tollhouse.orgs.set_credit_limit(org.id, member, 5, a))
            ),
            asyncio.create_task(
                as_admin(lambda a: tollhouse.orgs.remove_member(org.id, member, a))
            ),
        ]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in attempts)
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    refused = [isinstance(o, e.OrganisationPermissionDenied) for o in outcomes]
    if naive:
        assert not any(refused), outcomes
        return
    assert all(refused), outcomes
    assert len(await tollhouse.orgs.members(org.id)) == 3


async def _step_down(
    conn: psycopg.AsyncConnection[Any], org: uuid.UUID, target: uuid.UUID, how: str, naive: bool
) -> None:
    """One owner demotes or removes `target`; the naive control counts owners first and
    writes only when another owner seems to remain (with the trigger disabled)."""
    try:
        async with conn.transaction():
            if naive:
                cur = await conn.execute(
                    "SELECT count(*) FROM tollhouse.tenant_members"
                    " WHERE tenant_id = %s AND role = 'owner'",
                    (org,),
                )
                row = await cur.fetchone()
                await asyncio.sleep(0.005)
                if row is None or row[0] < 2:
                    return
            statement = (
                "UPDATE tollhouse.tenant_members SET role = 'member'"
                if how == "demote"
                else "DELETE FROM tollhouse.tenant_members"
            )
            await conn.execute(
                statement + " WHERE tenant_id = %s AND user_id = %s",
                (org, target),
            )
    except psycopg.errors.CheckViolation:
        pass


@pytest.mark.parametrize(("naive", "runs"), [(False, 1000), (True, 60)], ids=["trigger", "naive"])
async def test_o04_owners_stepping_down_at_once_leave_one(
    tollhouse: Tollhouse, dsn: str, naive: bool, runs: int
) -> None:
    """O-04: two owners demote or remove each other (or themselves) at once, 1,000 times:
    no organisation is ever left without an owner. The naive count-then-write version
    (trigger disabled) is, which shows the test can see it."""
    a, b = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, a, b, pool=1)
    first = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    second = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    if naive:
        await first.execute(
            "ALTER TABLE tollhouse.tenant_members DISABLE TRIGGER tenant_members_owner_check"
        )
    ownerless = 0
    try:
        for run in range(runs):
            await first.execute(
                "INSERT INTO tollhouse.tenant_members (tenant_id, user_id, role)"
                " VALUES (%(o)s, %(a)s, 'owner'), (%(o)s, %(b)s, 'owner')"
                " ON CONFLICT (tenant_id, user_id) DO UPDATE SET role = 'owner'",
                {"o": org.id, "a": a, "b": b},
            )
            hows = [("demote", "demote"), ("remove", "remove"), ("demote", "remove")][run % 3]
            await asyncio.gather(
                _step_down(first, org.id, b, hows[0], naive),
                _step_down(second, org.id, a, hows[1], naive),
            )
            cur = await first.execute(
                "SELECT count(*) FROM tollhouse.tenant_members"
                " WHERE tenant_id = %s AND role = 'owner'",
                (org.id,),
            )
            ownerless += await cur.fetchone() == (0,)
            if naive and ownerless:
                break
    finally:
        await first.close()
        await second.close()
    assert (ownerless > 0) if naive else (ownerless == 0)


# --- member limits and the pool ----------------------------------------------------------------


async def naive_member_debit(tollhouse: Tollhouse, org: uuid.UUID, member: uuid.UUID) -> str:
    """The control for O-01: read the member's use, check, debit, write the use back."""
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT credit_limit, used_credits FROM tollhouse.tenant_member_credit_limits"
            " WHERE tenant_id = %s AND user_id = %s",
            (org, member),
        )
        row = await cur.fetchone()
        assert row is not None
        if row[0] >= 0 and row[1] + 1 > row[0]:
            return "member_limit_exceeded"
        await asyncio.sleep(0.005)
        result = await tollhouse.credits.debit(
            DebitRequest(amount=1, turn_id=uuid.uuid4().hex, tenant_id=org)
        )
        await conn.execute(
            "UPDATE tollhouse.tenant_member_credit_limits SET used_credits = %s"
            " WHERE tenant_id = %s AND user_id = %s",
            (row[1] + 1, org, member),
        )
        return result.status


@pytest.mark.parametrize("naive", [False, True], ids=["gate", "naive-control"])
async def test_o01_member_limit_holds_under_64_concurrent_debits(
    big: Tollhouse, naive: bool
) -> None:
    """O-01: 64 concurrent debits of 1 by a member limited to 20: exactly 20 apply, and the
    member's use and the pool agree; the naive read-then-write version overspends."""
    owner, member = await user(big), await user(big)
    org = await org_with(big, owner, member, pool=1000)
    await big.orgs.set_credit_limit(org.id, member, 20)
    debit = naive_member_debit if naive else spend
    outcomes = await asyncio.gather(*(debit(big, org.id, member) for _ in range(64)))
    applied = outcomes.count("applied")
    balance = await big.credits.balance(tenant_id=org.id)
    if naive:
        assert applied > 20
        return
    assert applied == 20 and outcomes.count("member_limit_exceeded") == 44
    assert balance.balance == 1100 - 20  # the pool and the free plan's 100
    found = await big.orgs.member(org.id, member)
    assert (found.used_credits, found.remaining_credits) == (20, 0)


async def test_o05_lowering_a_limit_below_use_stops_spending(tollhouse: Tollhouse) -> None:
    owner, member = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, member)
    for _ in range(5):
        assert await spend(tollhouse, org.id, member, 2) == "applied"
    lowered = await tollhouse.orgs.set_credit_limit(org.id, member, 4)
    assert (lowered.used_credits, lowered.remaining_credits) == (10, 0)
    assert await spend(tollhouse, org.id, member) == "member_limit_exceeded"
    assert (await tollhouse.credits.balance(tenant_id=org.id)).balance == 10_100 - 10
    assert await spend(tollhouse, org.id, owner) == "applied"  # others are unaffected


async def test_holds_count_against_the_member_limit(tollhouse: Tollhouse) -> None:
    owner, member = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, member)
    await tollhouse.orgs.set_credit_limit(org.id, member, 10)
    await tollhouse.credits.reserve(amount=8, turn_id="stream-1", tenant_id=org.id, user_id=member)
    assert await spend(tollhouse, org.id, member, 3) == "member_limit_exceeded"
    committed = await tollhouse.credits.commit(
        turn_id="stream-1", amount=5, tenant_id=org.id, user_id=member
    )
    assert committed.status == "applied"
    assert (await tollhouse.orgs.member(org.id, member)).used_credits == 5
    assert await spend(tollhouse, org.id, member, 5) == "applied"
    assert await spend(tollhouse, org.id, member, 1) == "member_limit_exceeded"


@pytest.mark.parametrize("who", ["member", "owner"])
async def test_a_membership_deleted_under_rls_voids_the_members_holds(
    tollhouse: Tollhouse, who: str
) -> None:
    """The member leaves, or the owner removes it, by deleting the membership row as an end
    user (not through OrgService): its pending hold on the pool is released all the same."""
    owner, member = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, member)
    held = await tollhouse.credits.reserve(
        amount=30, turn_id="stream", tenant_id=org.id, user_id=member
    )
    assert held.status == "pending"
    async with tollhouse.db.as_end_user(owner if who == "owner" else member) as conn:
        cur = await conn.execute(
            "DELETE FROM tollhouse.tenant_members WHERE tenant_id = %s AND user_id = %s",
            (org.id, member),
        )
        assert cur.rowcount == 1
    balance = await tollhouse.credits.balance(tenant_id=org.id)
    assert balance.available == balance.balance
    late = await tollhouse.credits.commit(turn_id="stream", amount=10, tenant_id=org.id)
    assert late.code == "reservation_released"


async def test_an_owner_leaving_under_rls_while_the_service_removes_a_member_both_finish(
    tollhouse: Tollhouse, dsn: str
) -> None:
    """The service locks the tenant, then the account (OrgService); a membership deleted
    under RLS locks them through its triggers. Taken the other way round by the hold-voiding
    trigger (the account first), the two deadlocked."""
    owner, second, member = await user(tollhouse), await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, member)
    await tollhouse.orgs.add_member(org.id, second, role="owner")
    delete = "DELETE FROM tollhouse.tenant_members WHERE tenant_id = %s AND user_id = %s"
    async with (
        await psycopg.AsyncConnection.connect(dsn) as service,
        await psycopg.AsyncConnection.connect(dsn) as end_user,
    ):
        await service.execute(
            "SELECT id FROM tollhouse.tenants WHERE id = %s FOR NO KEY UPDATE", (org.id,)
        )
        await end_user.execute(
            "SELECT set_config('role', 'tollhouse_user', true),"
            " set_config('tollhouse.user_id', %s, true)",
            (str(second),),
        )
        leaving = asyncio.create_task(end_user.execute(delete, (org.id, second)))
        await a_lock_wait(dsn, leaving)  # until the leaving owner waits for a lock
        await service.execute(delete, (org.id, member))
        await service.commit()
        assert (await leaving).rowcount == 1
        await end_user.commit()
    assert {m.user_id for m in await tollhouse.orgs.members(org.id)} == {owner}


async def test_non_members_cannot_spend_from_a_pool(tollhouse: Tollhouse) -> None:
    owner, stranger = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner)
    assert await spend(tollhouse, org.id, stranger, turn="t-1") == "not_a_member"
    personal = await tollhouse.credits.tenant_of(None, owner)
    assert await spend(tollhouse, personal, stranger) == "not_a_member"
    await tollhouse.credits.grant(amount=10, source="promo", user_id=owner)
    assert await spend(tollhouse, personal, owner) == "applied"


async def test_o02_removal_and_debit_serialize_on_the_member_row(
    tollhouse: Tollhouse, dsn: str
) -> None:
    """O-02, both interleavings. A debit holding the member's row makes the removal wait
    until it commits; a removal not yet committed makes the debit wait, then refuse. The
    naive control (membership read without a lock) lets a debit commit after the removal."""
    owner, member = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, member)
    debit_sql = (
        "SELECT status, code FROM tollhouse.credit_debit_v1(%s, %s, 1, %s, NULL, 'llm_usage', NULL)"
    )
    # 1. The debit first: the removal waits for its commit.
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(debit_sql, (org.id, member, "early"))
        assert await cur.fetchone() == ("applied", None)
        removal = asyncio.create_task(tollhouse.orgs.remove_member(org.id, member, owner))
        await asyncio.sleep(0.3)
        assert not removal.done()
        await conn.commit()
    await removal
    # 2. The removal first (not yet committed): the debit waits, then is refused.
    await tollhouse.orgs.add_member(org.id, member)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            "DELETE FROM tollhouse.tenant_members WHERE tenant_id = %s AND user_id = %s",
            (org.id, member),
        )
        late = asyncio.create_task(spend(tollhouse, org.id, member, turn="late"))
        naive = await tollhouse.db.transaction(
            lambda c: c.execute(
                "SELECT count(*) FROM tollhouse.tenant_members"
                " WHERE tenant_id = %s AND user_id = %s",
                (org.id, member),
            )
        )
        naive_sees_member = (await naive.fetchone()) == (1,)
        await asyncio.sleep(0.3)
        assert not late.done()
        await conn.commit()
    assert await late == "not_a_member"
    assert naive_sees_member  # the control's unlocked read would have let the debit through


@pytest.mark.parametrize("naive", [False, True], ids=["gate", "naive-control"])
async def test_o02_removal_mid_storm_of_64_debits(big: Tollhouse, naive: bool) -> None:
    """O-02: 64 in-flight debits by a member while the removal commits. No debit that
    committed after the removal applied: ledger ids are uuid7 stamped on the database clock
    when the debit is decided, and the removal holds the pool's account until it commits, so
    an applied debit's stamp must precede a database time read right after the removal.
    Debits sent after the removal returned are refused; the member's hold is voided; the
    pool is conserved. The naive control (membership read without a lock, then the debit)
    lets debits through after the removal."""
    owner, member = await user(big), await user(big)
    org = await org_with(big, owner, member)
    await big.credits.reserve(amount=50, turn_id="held", tenant_id=org.id, user_id=member)
    removed = asyncio.Event()

    async def naive_debit(turn: str) -> str:
        async with big.db.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM tollhouse.tenant_members WHERE tenant_id = %s AND user_id = %s",
                (org.id, member),
            )
            if await cur.fetchone() is None:
                return "not_a_member"
        await asyncio.sleep(0.03)
        result = await big.credits.debit(DebitRequest(amount=1, turn_id=turn, tenant_id=org.id))
        return result.code or result.status

    async def one(i: int) -> tuple[bool, str]:
        await asyncio.sleep(0.002 * i)
        after = removed.is_set()
        turn = f"storm-{i}"
        code = await (naive_debit(turn) if naive else spend(big, org.id, member, turn=turn))
        return after, code

    async def remove() -> datetime:
        await asyncio.sleep(0.06)
        await big.orgs.remove_member(org.id, member, owner)
        removed.set()
        async with big.db.connection() as conn:
            cur = await conn.execute("SELECT clock_timestamp()")
            row = await cur.fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    results, removal_done = await asyncio.gather(
        asyncio.gather(*(one(i) for i in range(64))), remove()
    )
    async with big.db.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM tollhouse.credit_ledger"
            " WHERE tenant_id = %s AND turn_id LIKE 'storm-%%'",
            (org.id,),
        )
        stamps = [uuid7_time(row[0]) for row in await cur.fetchall()]
    late = [stamp for stamp in stamps if stamp > removal_done]
    if naive:
        assert late, "the control should let a debit commit after the removal"
        return
    assert late == []
    assert all(code == "not_a_member" for after, code in results if after)
    applied = sum(code == "applied" for _, code in results)
    assert applied == len(stamps)
    balance = await big.credits.balance(tenant_id=org.id)
    assert balance.balance == 10_100 - applied and balance.available == balance.balance
    voided = await big.credits.commit(turn_id="held", amount=10, tenant_id=org.id, user_id=member)
    assert voided.code == "reservation_released"  # the removal voided the member's hold
    assert all(check.ok for check in await big.health.doctor())


def uuid7_time(value: uuid.UUID) -> datetime:
    """The millisecond a uuid7 was made, rounded down (so 'later than' is never a guess)."""
    return datetime.fromtimestamp((value.int >> 80) / 1000, UTC)


# --- invitations -----------------------------------------------------------------------------


async def test_invitation_flow_and_precise_errors(tollhouse: Tollhouse) -> None:
    owner = await user(tollhouse)
    invitee, intruder = await user(tollhouse, "inv"), await user(tollhouse, "intruder")
    org = await org_with(tollhouse, owner)
    issued = await tollhouse.orgs.invite(
        org.id, " INV@Example.com ", "admin", owner, credit_limit=7
    )
    assert (issued.invitation.email, issued.invitation.status) == ("inv@example.com", "pending")
    with pytest.raises(e.InvitationEmailMismatch):  # T-04: bound to the invited address
        await tollhouse.orgs.accept(issued.token, intruder)
    member = await tollhouse.orgs.accept(issued.token, invitee)
    assert (member.role, member.credit_limit) == ("admin", 7)  # taken from the stored invite
    with pytest.raises(e.InvitationUsed):
        await tollhouse.orgs.accept(issued.token, invitee)
    with pytest.raises(e.AlreadyMember):
        await tollhouse.orgs.invite(org.id, "inv@example.com", actor=owner)
    with pytest.raises(e.InvitationNotFound):
        await tollhouse.orgs.accept("thi_garbage", invitee)


async def test_t05_revoke_reinvite_and_resend_kill_older_tokens(tollhouse: Tollhouse) -> None:
    owner, invitee = await user(tollhouse), await user(tollhouse, "again")
    org = await org_with(tollhouse, owner)
    first = await tollhouse.orgs.invite(org.id, "again@example.com")
    second = await tollhouse.orgs.invite(org.id, "again@example.com")
    with pytest.raises(e.InvitationRevoked):
        await tollhouse.orgs.accept(first.token, invitee)
    resent = await tollhouse.orgs.resend(org.id, second.invitation.id)
    with pytest.raises(e.InvitationNotFound):
        await tollhouse.orgs.accept(second.token, invitee)
    await tollhouse.orgs.revoke(org.id, resent.invitation.id)
    with pytest.raises(e.InvitationRevoked):
        await tollhouse.orgs.accept(resent.token, invitee)
    statuses = [i.status for i in await tollhouse.orgs.invitations(org.id)]
    assert statuses == ["revoked", "revoked"]


async def test_t02_expiry_boundary_on_the_database_clock(tollhouse: Tollhouse) -> None:
    owner, invitee = await user(tollhouse), await user(tollhouse, "clock")
    org = await org_with(tollhouse, owner)
    late = await tollhouse.orgs.invite(org.id, "clock@example.com")

    async def expire_in(seconds: int, invitation: uuid.UUID) -> None:
        await tollhouse.db.transaction(
            lambda conn: conn.execute(
                "UPDATE tollhouse.tenant_invitations"
                " SET expires_at = now() + make_interval(secs => %s) WHERE id = %s",
                (seconds, invitation),
            )
        )

    await expire_in(-1, late.invitation.id)
    with pytest.raises(e.InvitationExpired):
        await tollhouse.orgs.accept(late.token, invitee)
    assert (await tollhouse.orgs.invitations(org.id))[0].status == "expired"
    resent = await tollhouse.orgs.resend(org.id, late.invitation.id)
    await expire_in(1, resent.invitation.id)
    assert (await tollhouse.orgs.accept(resent.token, invitee)).user_id == invitee


async def test_resending_an_expired_invitation_a_newer_one_replaced_is_refused(
    tollhouse: Tollhouse,
) -> None:
    """The first invitation expired and a second to the same address is pending: resending
    the first is 409 invitation_superseded (it was the bare `conflict` of the unique index),
    and the second still works."""
    owner = await user(tollhouse)
    org = await org_with(tollhouse, owner)
    first = await tollhouse.orgs.invite(org.id, "x@example.com")
    await tollhouse.db.transaction(
        lambda conn: conn.execute(
            "UPDATE tollhouse.tenant_invitations SET expires_at = now() - interval '1 minute'"
            " WHERE id = %s",
            (first.invitation.id,),
        )
    )
    second = await tollhouse.orgs.invite(org.id, "x@example.com")
    with pytest.raises(e.InvitationSuperseded):
        await tollhouse.orgs.resend(org.id, first.invitation.id)
    assert (
        await tollhouse.orgs.resend(org.id, second.invitation.id)
    ).invitation.status == "pending"


async def naive_accept(tollhouse: Tollhouse, token: str, user_id: uuid.UUID) -> None:
    """The control for T-03: read the invitation's status, then accept without a lock."""
    selector = uuid.UUID(hex=token[4:36])
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT i.tenant_id, i.id, i.status FROM tollhouse.tenant_invitations i"
            " WHERE i.selector = %s",
            (selector,),
        )
        row = await cur.fetchone()
        assert row is not None
        if row[2] != "pending":
            raise e.InvitationUsed()
        await asyncio.sleep(0.01)
        await conn.execute(
            "INSERT INTO tollhouse.tenant_members (tenant_id, user_id, role)"
            " VALUES (%s, %s, 'member') ON CONFLICT DO NOTHING",
            (row[0], user_id),
        )
        await conn.execute(
            "UPDATE tollhouse.tenant_invitations SET status = 'accepted' WHERE id = %s", (row[1],)
        )


@pytest.mark.parametrize("naive", [False, True], ids=["locked", "naive-control"])
async def test_t03_fifty_concurrent_accepts_make_one_membership(
    big: Tollhouse, naive: bool
) -> None:
    """T-03: of 50 concurrent accepts of one invitation exactly one succeeds and 49 get
    409/410; the naive read-then-accept control reports many acceptances."""
    owner, invitee = await user(big), await user(big, f"race-{naive}")
    org = await org_with(big, owner)
    issued = await big.orgs.invite(org.id, f"race-{naive}@example.com")
    accept = naive_accept if naive else (lambda th, token, uid: th.orgs.accept(token, uid))
    outcomes = await asyncio.gather(
        *(accept(big, issued.token, invitee) for _ in range(50)), return_exceptions=True
    )
    successes = sum(not isinstance(o, BaseException) for o in outcomes)
    assert len(await big.orgs.members(org.id)) == 2  # the primary key holds either way
    if naive:
        assert successes > 1
        return
    assert successes == 1
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(x, (e.InvitationUsed, e.AlreadyMember)) for x in errors), errors


async def test_t01_invitation_tokens_are_never_stored(tollhouse: Tollhouse, dsn: str) -> None:
    """T-01: 30 issued tokens and a resend; neither a full pg_dump nor the captured logs
    hold any of their secrets; each secret carries 256 random bits."""
    owner = await user(tollhouse)
    org = await org_with(tollhouse, owner)
    with capture_logs() as logs:
        issued = [await tollhouse.orgs.invite(org.id, f"t{i}@example.com") for i in range(30)]
        issued.append(await tollhouse.orgs.resend(org.id, issued[0].invitation.id))
    dump = data_dump(dsn)
    assert "tenant_invitations" in dump
    logged = repr(logs)
    for item in issued:
        secret = item.token.split(".", 1)[1]
        assert len(secret) == 43 and re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)
        assert secret not in dump and secret not in logged


async def test_t07_t08_forged_and_unknown_tokens_answer_alike(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """T-07/T-08 for invitations: a right selector with a wrong secret, an unknown selector
    and garbage all get the same answer (no oracle to guess against); inviting an address
    with an account and one without gives the same status and the same body shape."""
    owner, invitee = await user(tollhouse), await user(tollhouse, "known")
    org = await org_with(tollhouse, owner)
    known = await client.post(
        f"/v1/orgs/{org.id}/invitations", json={"email": "known@example.com"}, headers=auth
    )
    unknown = await client.post(
        f"/v1/orgs/{org.id}/invitations", json={"email": "nobody@example.com"}, headers=auth
    )
    assert known.status_code == unknown.status_code == 201
    assert set(known.json()) == set(unknown.json())
    token = known.json()["token"]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    other_selector = "thi_" + uuid.uuid4().hex + token[-44:]
    answers = []
    for candidate in (forged, other_selector, "thi_x"):
        reply = await client.post(
            "/v1/invitations/accept",
            json={"token": candidate, "user_id": str(invitee)},
            headers=auth,
        )
        answers.append((reply.status_code, reply.json()["error"]["code"]))
    assert answers == [(404, "invitation_not_found")] * 3


# --- HTTP --------------------------------------------------------------------------------------


async def test_http_contract_with_sessions_and_service_key(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    from tests.support.flows import verified_account

    owner_in, _ = await verified_account(tollhouse, "boss@example.com")
    member_in, _ = await verified_account(tollhouse, "worker@example.com")
    boss = {"Authorization": f"Bearer {owner_in.session_token}"}
    worker = {"Authorization": f"Bearer {member_in.session_token}"}
    created = await client.post("/v1/orgs", json={"name": "Acme", "slug": "acme"}, headers=boss)
    assert created.status_code == 201 and created.json()["role"] == "owner"
    org = created.json()["id"]
    bad = await client.post("/v1/orgs", json={"name": "X", "slug": "Not A Slug"}, headers=boss)
    assert bad.status_code == 422
    taken = await client.post("/v1/orgs", json={"name": "X", "slug": "acme"}, headers=worker)
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "slug_taken")
    hidden = await client.get(f"/v1/orgs/{org}", headers=worker)
    assert hidden.status_code == 404
    invited = await client.post(
        f"/v1/orgs/{org}/invitations",
        json={"email": "worker@example.com", "credit_limit": 3},
        headers=boss,
    )
    assert invited.status_code == 201
    accepted = await client.post(
        "/v1/invitations/accept", json={"token": invited.json()["token"]}, headers=worker
    )
    assert accepted.status_code == 200 and accepted.json()["remaining_credits"] == 3
    denied = await client.post(
        f"/v1/orgs/{org}/invitations", json={"email": "z@example.com"}, headers=worker
    )
    assert (denied.status_code, denied.json()["error"]["code"]) == (
        403,
        "organisation_permission_denied",
    )
    await tollhouse.credits.grant(amount=100, source="purchase", tenant_id=uuid.UUID(org))
    debit = {
        "tenant_id": org,
        "user_id": str(member_in.user.id),
        "amount": 2,
        "turn_id": "t-1",
    }
    ok = await client.post("/v1/credits/debit", json=debit, headers=auth)
    assert ok.status_code == 200
    over = await client.post("/v1/credits/debit", json={**debit, "turn_id": "t-2"}, headers=auth)
    assert (over.status_code, over.json()["error"]["code"]) == (403, "member_limit_exceeded")
    limit = await client.put(
        f"/v1/orgs/{org}/members/{member_in.user.id}/credit-limit",
        json={"credit_limit": -1},
        headers=boss,
    )
    assert limit.status_code == 200 and limit.json()["remaining_credits"] is None
    mine = await client.get(f"/v1/users/{member_in.user.id}/orgs", headers=worker)
    assert [o["id"] for o in mine.json()["organisations"]] == [org]
    others = await client.get(f"/v1/users/{owner_in.user.id}/orgs", headers=worker)
    assert others.status_code == 403
    members = await client.get(f"/v1/orgs/{org}/members", headers=worker)
    assert {m["role"] for m in members.json()["members"]} == {"owner", "member"}
    left = await client.delete(f"/v1/orgs/{org}/members/{member_in.user.id}", headers=worker)
    assert left.status_code == 204
    gone = await client.post("/v1/credits/debit", json={**debit, "turn_id": "t-3"}, headers=auth)
    assert (gone.status_code, gone.json()["error"]["code"]) == (403, "not_a_member")
    deleted = await client.delete(f"/v1/orgs/{org}", headers=boss)
    assert deleted.status_code == 204
    seen = await client.get(f"/v1/orgs/{org}", headers=auth)
    assert seen.json()["deleted_at"] is not None


# --- rules found in review ---------------------------------------------------------------------


async def test_a_replay_answers_on_a_deleted_organisation(tollhouse: Tollhouse) -> None:
    owner = await user(tollhouse)
    org = await org_with(tollhouse, owner)
    request = DebitRequest(amount=3, turn_id="before", tenant_id=org.id, user_id=owner)
    first = await tollhouse.credits.debit(request)
    await tollhouse.orgs.delete(org.id, owner)
    again = await tollhouse.credits.debit(request)
    assert (again.status, again.ledger_id, again.replayed) == ("applied", first.ledger_id, True)
    assert await spend(tollhouse, org.id, owner) == "not_found"


async def test_a_commit_checks_the_holder_before_giving_the_hold_back(
    tollhouse: Tollhouse,
) -> None:
    owner, member = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, member)
    await tollhouse.credits.reserve(amount=40, turn_id="svc", tenant_id=org.id)
    stranger = await user(tollhouse)
    committed = await tollhouse.credits.commit(
        turn_id="svc", amount=30, tenant_id=org.id, user_id=stranger
    )
    assert committed.status == "applied"  # the service's hold: charged to the pool
    await tollhouse.credits.reserve(amount=20, turn_id="m", tenant_id=org.id, user_id=member)
    # The holder stops being one who may spend behind the service's back. (Deleting its
    # membership would void the hold: tenant_members_void_holds.)
    await tollhouse.db.transaction(
        lambda conn: conn.execute(
            "UPDATE tollhouse.users SET deleted_at = now() WHERE id = %s", (member,)
        )
    )
    refused = await tollhouse.credits.commit(turn_id="m", amount=5, tenant_id=org.id)
    assert refused.code == "not_a_member"
    balance = await tollhouse.credits.balance(tenant_id=org.id)
    assert balance.available == balance.balance - 20  # the hold is still there


async def test_a_deleted_user_spends_nothing_from_a_pool(tollhouse: Tollhouse) -> None:
    owner, member = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, member)
    await tollhouse.users.delete(member)
    assert await spend(tollhouse, org.id, member) == "not_a_member"


async def test_admins_do_not_set_their_own_or_owners_limits(tollhouse: Tollhouse) -> None:
    owner, admin = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, admin)
    await tollhouse.orgs.change_role(org.id, admin, "admin")
    for target in (admin, owner):
        with pytest.raises(e.OrganisationPermissionDenied):
            await tollhouse.orgs.set_credit_limit(org.id, target, -1, admin)
    assert (await tollhouse.orgs.set_credit_limit(org.id, admin, 9, owner)).credit_limit == 9


async def test_an_admin_gives_no_credit_limit_above_its_own(tollhouse: Tollhouse) -> None:
    """Two admins capped at 10 could lift each other's caps, or one add (or invite) a second
    account of its own without any, and spend the pool past what the owner allowed."""
    owner, first, second, alt = [await user(tollhouse) for _ in range(4)]
    org = await org_with(tollhouse, owner, first, second)
    for admin in (first, second):
        await tollhouse.orgs.change_role(org.id, admin, "admin", owner)
        await tollhouse.orgs.set_credit_limit(org.id, admin, 10, owner)
    with pytest.raises(e.OrganisationPermissionDenied):
        await tollhouse.orgs.set_credit_limit(org.id, second, -1, first)
    with pytest.raises(e.OrganisationPermissionDenied):
        await tollhouse.orgs.add_member(org.id, alt, actor=first)  # unlimited by default
    with pytest.raises(e.OrganisationPermissionDenied):
        await tollhouse.orgs.add_member(org.id, alt, actor=first, credit_limit=11)
    with pytest.raises(e.OrganisationPermissionDenied):
        await tollhouse.orgs.invite(org.id, "alt-admin@example.com", actor=first)
    added = await tollhouse.orgs.add_member(org.id, alt, actor=first, credit_limit=10)
    assert added.credit_limit == 10
    assert (await tollhouse.orgs.set_credit_limit(org.id, alt, 4, first)).credit_limit == 4
    assert (await tollhouse.orgs.set_credit_limit(org.id, second, -1, owner)).credit_limit == -1


async def test_an_invitation_dies_with_its_inviters_authority(tollhouse: Tollhouse) -> None:
    """An admin invites its own second address as admin, is removed, and would get back in
    by accepting."""
    owner, admin, alt = await user(tollhouse), await user(tollhouse), await user(tollhouse, "alt")
    org = await org_with(tollhouse, owner, admin)
    await tollhouse.orgs.change_role(org.id, admin, "admin", owner)
    issued = await tollhouse.orgs.invite(org.id, "alt@example.com", "admin", admin)
    await tollhouse.orgs.remove_member(org.id, admin, owner)
    with pytest.raises(e.InvitationRevoked):
        await tollhouse.orgs.accept(issued.token, alt)
    assert {m.user_id for m in await tollhouse.orgs.members(org.id)} == {owner}
    # The owner's own invitation still works.
    again = await tollhouse.orgs.invite(org.id, "alt@example.com", "admin", owner)
    assert (await tollhouse.orgs.accept(again.token, alt)).role == "admin"


async def test_the_sole_live_owner_cannot_be_soft_deleted(tollhouse: Tollhouse) -> None:
    """Deleting the user changed no membership, so the owner rule never ran: the
    organisation kept only a deleted owner, and nobody could act as its owner."""
    owner, admin, second = await user(tollhouse), await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, owner, admin)
    await tollhouse.orgs.change_role(org.id, admin, "admin", owner)
    with pytest.raises(e.LastOwner):
        await tollhouse.users.delete(owner)
    assert (await tollhouse.users.get(owner)).deleted_at is None
    await tollhouse.orgs.add_member(org.id, second, "owner", owner)
    await tollhouse.users.delete(owner)
    assert (await tollhouse.orgs.get(org.id)).owner_user_id == second  # a live owner
    with pytest.raises(e.LastOwner):  # the remaining live owner cannot leave either
        await tollhouse.orgs.remove_member(org.id, second, second)


async def test_a_suspended_owner_does_not_count_as_an_owner(tollhouse: Tollhouse) -> None:
    active, suspended = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, active)
    await tollhouse.orgs.add_member(org.id, suspended, "owner", active)
    await tollhouse.users.update(suspended, {"status": "suspended"})
    with pytest.raises(e.LastOwner):
        await tollhouse.orgs.remove_member(org.id, active, active)
    with pytest.raises(e.MemberNotFound):  # nor is ownership handed to it
        await tollhouse.orgs.transfer_ownership(org.id, suspended, active)


async def test_deleting_an_owner_and_removing_the_other_at_once_keeps_one(
    tollhouse: Tollhouse, dsn: str
) -> None:
    """Write skew: one transaction deletes owner A, another removes owner B. Both triggers
    write the tenant row first, so the second waits and then sees the first."""
    first, second = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, first)
    await tollhouse.orgs.add_member(org.id, second, "owner", first)
    async with await psycopg.AsyncConnection.connect(dsn) as deleting:
        await deleting.execute(
            "UPDATE tollhouse.users SET deleted_at = now() WHERE id = %s", (first,)
        )
        removal = asyncio.create_task(tollhouse.orgs.remove_member(org.id, second, second))
        await a_lock_wait(dsn, removal)
        await deleting.commit()
    with pytest.raises(e.LastOwner):
        await removal
    assert {m.user_id for m in await tollhouse.orgs.members(org.id)} == {first, second}


async def test_the_owner_of_record_follows_the_owners(tollhouse: Tollhouse) -> None:
    first, second = await user(tollhouse), await user(tollhouse)
    org = await org_with(tollhouse, first, second)
    await tollhouse.orgs.change_role(org.id, second, "owner")
    await tollhouse.orgs.change_role(org.id, first, "admin")
    assert (await tollhouse.orgs.get(org.id)).owner_user_id == second
    personal = await tollhouse.credits.tenant_of(None, first)
    with pytest.raises(e.PersonalTenant):  # a personal tenant keeps its owner
        await tollhouse.db.transaction(
            lambda conn: conn.execute(
                "DELETE FROM tollhouse.tenant_members WHERE tenant_id = %s", (personal,)
            ),
            constraints={"tenant_members_personal_check": e.PersonalTenant},
        )


async def test_blank_names_are_refused(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    owner = await user(tollhouse)
    reply = await client.post(
        "/v1/orgs", json={"name": "   ", "slug": "blank", "owner_user_id": str(owner)}, headers=auth
    )
    assert reply.status_code == 422
    with pytest.raises(e.InvalidRequest):
        await tollhouse.orgs.create(" ", "blank-two", owner)


async def test_an_organisation_subscribes_like_a_user(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, stripe_api: Any
) -> None:
    """Issue 6: the organisation's own account, Checkout through Stripe (owners and admins),
    and a subscription that moves the pool's plan."""
    from tests.support import billing as b
    from tests.support import fake_stripe as fs
    from tests.support.flows import verified_account

    await b.load_prices(client)
    boss_in, _ = await verified_account(tollhouse, f"boss-{uuid.uuid4().hex[:6]}@example.com")
    hand_in, _ = await verified_account(tollhouse, f"hand-{uuid.uuid4().hex[:6]}@example.com")
    org = await tollhouse.orgs.create("Paying", f"paying-{uuid.uuid4().hex[:6]}", boss_in.user.id)
    await tollhouse.orgs.add_member(org.id, hand_in.user.id)
    body = {
        "price_id": b.PRO,
        "success_url": "https://a.example/ok",
        "cancel_url": "https://a.example/no",
    }
    member = {"Authorization": f"Bearer {hand_in.session_token}"}
    refused = await client.post(f"/v1/orgs/{org.id}/checkout", json=body, headers=member)
    assert (refused.status_code, refused.json()["error"]["code"]) == (
        403,
        "organisation_permission_denied",
    )
    owner = {"Authorization": f"Bearer {boss_in.session_token}"}
    checkout = await client.post(f"/v1/orgs/{org.id}/checkout", json=body, headers=owner)
    assert checkout.status_code == 200, checkout.text
    billing = (await client.get(f"/v1/orgs/{org.id}/billing", headers=member)).json()
    customer = billing["customer_id"]
    assert customer and billing["plan"] == "free"
    start, end = b.period()
    sub = fs.subscription(
        "sub_org_" + uuid.uuid4().hex[:6], customer, b.PRICES[b.PRO], start=start, end=end
    )
    await b.ok(client, fs.event("customer.subscription.created", sub))
    after = (await client.get(f"/v1/orgs/{org.id}/billing", headers=auth)).json()
    assert after["plan"] == "pro" and after["subscription"]["plan"] == "pro"
    pool = await tollhouse.credits.balance(tenant_id=org.id)
    assert pool.plan == "pro"
    personal = await tollhouse.credits.balance(user_id=boss_in.user.id)
    assert personal.plan == "free"  # the owner's own plan is untouched


async def test_a_checkout_naming_the_organisation_links_its_customer_to_the_organisation(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """A Checkout Session made elsewhere (a payment link, the dashboard) whose
    client_reference_id is the organisation's tenant id: its customer is the organisation's,
    and the subscription moves the organisation's pool, not its owner's account."""
    from tests.support import billing as b
    from tests.support import fake_stripe as fs
    from tests.support.flows import verified_account

    await b.load_prices(client)
    boss_in, _ = await verified_account(tollhouse, f"boss-{uuid.uuid4().hex[:6]}@example.com")
    org = await tollhouse.orgs.create("Linked", f"linked-{uuid.uuid4().hex[:6]}", boss_in.user.id)
    customer = fs.new_id("cus")
    session = b.subscription_session(
        customer, str(org.id), payment_status="paid", status="complete"
    )
    assert (await b.ok(client, fs.event("checkout.session.completed", session)))["status"] == (
        "processed"
    )
    start, end = b.period()
    sub = fs.subscription(
        "sub_orgref_" + uuid.uuid4().hex[:6], customer, b.PRICES[b.PRO], start=start, end=end
    )
    await b.ok(client, fs.event("customer.subscription.created", sub))
    billing = (await client.get(f"/v1/orgs/{org.id}/billing", headers=auth)).json()
    assert (billing["customer_id"], billing["plan"]) == (customer, "pro")
    assert (await tollhouse.credits.balance(tenant_id=org.id)).plan == "pro"
    assert (await tollhouse.credits.balance(user_id=boss_in.user.id)).plan == "free"
    # Row-level security: a member reads the organisation's subscription; only owners and
    # admins read its customer (the payer's personal data).
    hand_in, _ = await verified_account(tollhouse, f"hand-{uuid.uuid4().hex[:6]}@example.com")
    await tollhouse.orgs.add_member(org.id, hand_in.user.id)
    seen = {}
    for who in (hand_in.user.id, boss_in.user.id):
        async with tollhouse.db.as_end_user(who) as conn:
            subs = await (await conn.execute("SELECT id FROM tollhouse.subscriptions")).fetchall()
            customers = await (
                await conn.execute("SELECT customer_id FROM tollhouse.billing_customers")
            ).fetchall()
            seen[who] = (subs, customers)
    assert seen[hand_in.user.id] == ([(sub["id"],)], [])
    assert seen[boss_in.user.id] == ([(sub["id"],)], [(customer,)])
