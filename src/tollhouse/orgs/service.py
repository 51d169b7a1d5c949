"""Organisations, members, invitations and member credit limits.

`actor` names the user on whose behalf a change is made; None is the service itself (a
service key), which may do anything. A change locks the tenant row, then checks the actor's
role, then writes, all in one transaction: a demotion that commits first is seen, and one
that comes later waits. The database keeps the last owner (trigger
`tenant_members_owner_check`) and personal tenants single-membered, whatever the caller.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from psycopg.rows import class_row, dict_row

from tollhouse import errors as e
from tollhouse.db.pool import Conn, Database
from tollhouse.db.queries import Queries
from tollhouse.identity import tokens
from tollhouse.identity.emails import normalise_email
from tollhouse.ids import uuid7
from tollhouse.orgs.records import (
    UNLIMITED,
    Invitation,
    InviteRole,
    IssuedInvitation,
    Member,
    Organisation,
    Role,
)

queries = Queries("tollhouse.orgs", "queries.sql")
T = TypeVar("T")

INVITATION_PREFIX = "thi"
INVITATION_TTL = timedelta(days=7)
OWNER, ADMIN, MEMBER = "owner", "admin", "member"
MANAGERS = frozenset({OWNER, ADMIN})
EVERYONE = frozenset({OWNER, ADMIN, MEMBER})

_CONSTRAINTS = {
    "tenants_slug_key": e.SlugTaken,
    "tenants_slug_check": e.InvalidRequest,
    "tenants_name_check": e.InvalidRequest,
    "tenants_name_blank_check": e.InvalidRequest,
    "tenants_logo_url_check": e.InvalidRequest,
    "tenant_members_owner_check": e.LastOwner,
    "tenant_members_personal_check": e.PersonalTenant,
    "tenant_invitations_email_check": e.InvalidEmail,
    "tenant_invitations_pending_key": e.InvitationSuperseded,
    "tenant_member_credit_limits_limit_check": e.InvalidRequest,
}


@dataclass(frozen=True)
class _Locked:
    """The locked tenant of a change and the actor's role in it (None for the service)."""

    id: uuid.UUID
    is_default: bool
    deleted: bool
    actor_role: str | None


class OrgService:
    """Organisations over one pool."""

    def __init__(self, db: Database, *, invitation_ttl: timedelta = INVITATION_TTL) -> None:
        self._db = db
        self._ttl = invitation_ttl

    async def _run(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._db.transaction(work, constraints=_CONSTRAINTS)

    async def _lock(
        self,
        conn: Conn,
        tenant_id: uuid.UUID,
        actor: uuid.UUID | None,
        allowed: Collection[str],
        *,
        deleted_ok: bool = False,
        personal_ok: bool = True,
    ) -> _Locked:
        """Lock the tenant and check that the actor may act on it."""
        cur = await conn.execute(queries["lock"], {"id": tenant_id})
        row = await cur.fetchone()
        if row is None or (row[2] and not deleted_ok):
            raise e.OrganisationNotFound(tenant_id=str(tenant_id))
        role = None
        if actor is not None:
            params = {"id": tenant_id, "user_id": actor}
            role = await _scalar(await conn.execute(queries["member_role"], params))
        locked = _Locked(row[0], row[1], row[2], role)
        if actor is not None:
            if locked.actor_role is None:
                # Not a member: the organisation is not there for this user.
                raise e.OrganisationNotFound(tenant_id=str(tenant_id))
            if locked.actor_role not in allowed:
                raise e.OrganisationPermissionDenied(role=locked.actor_role)
        if locked.is_default and not personal_ok:
            raise e.PersonalTenant(tenant_id=str(tenant_id))
        return locked

    # --- organisations ---------------------------------------------------------------------

    async def create(
        self, name: str, slug: str, owner: uuid.UUID, *, logo_url: str | None = None
    ) -> Organisation:
        """A new organisation whose creator is its owner."""
        params = {"id": uuid7(), "name": name, "slug": slug, "logo_url": logo_url, "owner": owner}

        async def work(conn: Conn) -> Organisation:
            cur = conn.cursor(row_factory=class_row(Organisation))
            await cur.execute(queries["create"], params)
            org = await cur.fetchone()
            if org is None:
                raise e.UserNotFound(user_id=str(owner))
            return org

        return await self._run(work)

    async def get(
        self, tenant_id: uuid.UUID, actor: uuid.UUID | None = None, *, include_deleted: bool = False
    ) -> Organisation:
        """One organisation, as its member `actor` (or the service) sees it."""
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(Organisation))
            await cur.execute(queries["get"], {"id": tenant_id, "actor": actor})
            org = await cur.fetchone()
        if (
            org is None
            or (actor is not None and org.role is None)
            or (org.deleted_at is not None and not include_deleted)
        ):
            raise e.OrganisationNotFound(tenant_id=str(tenant_id))
        return org

    async def for_user(self, user_id: uuid.UUID) -> list[Organisation]:
        """The organisations a user belongs to (not its personal tenant, not deleted ones)."""
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(Organisation))
            await cur.execute(queries["for_user"], {"user_id": user_id})
            return await cur.fetchall()

    async def update(
        self,
        tenant_id: uuid.UUID,
        actor: uuid.UUID | None = None,
        *,
        name: str | None = None,
        slug: str | None = None,
        logo_url: str | None = None,
        set_logo: bool = False,
    ) -> Organisation:
        """Rename, change the slug or the logo (owners and admins)."""

        async def work(conn: Conn) -> None:
            await self._lock(conn, tenant_id, actor, MANAGERS, personal_ok=slug is None)
            await conn.execute(
                queries["update"],
                {
                    "id": tenant_id,
                    "name": name,
                    "slug": slug,
                    "logo_url": logo_url,
                    "set_logo": set_logo,
                },
            )

        await self._run(work)
        return await self.get(tenant_id, actor)

    async def delete(self, tenant_id: uuid.UUID, actor: uuid.UUID | None = None) -> None:
        """Soft-delete (owners): nothing more is spent from it; `restore` undoes it."""
        await self._set_deleted(tenant_id, actor, deleted=True)

    async def restore(self, tenant_id: uuid.UUID, actor: uuid.UUID | None = None) -> Organisation:
        """Undo a soft delete (owners)."""
        await self._set_deleted(tenant_id, actor, deleted=False)
        return await self.get(tenant_id, actor)

    async def _set_deleted(
        self, tenant_id: uuid.UUID, actor: uuid.UUID | None, *, deleted: bool
    ) -> None:
        async def work(conn: Conn) -> None:
            await self._lock(
                conn, tenant_id, actor, {OWNER}, deleted_ok=not deleted, personal_ok=False
            )
            # The pool's account next, as debits take it: a debit already past its checks
            # commits before the delete, and none starts spending after it.
            await conn.execute(queries["lock_account"], {"id": tenant_id})
            await conn.execute(queries["set_deleted"], {"id": tenant_id, "deleted": deleted})

        await self._run(work)

    # --- members ---------------------------------------------------------------------------

    async def members(self, tenant_id: uuid.UUID, actor: uuid.UUID | None = None) -> list[Member]:
        """Every member with its limit and use (any member may look)."""
        await self.get(tenant_id, actor)
        return await self._members(tenant_id)

    async def member(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID, actor: uuid.UUID | None = None
    ) -> Member:
        await self.get(tenant_id, actor)
        found = await self._members(tenant_id, user_id)
        if not found:
            raise e.MemberNotFound(user_id=str(user_id))
        return found[0]

    async def _members(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID | None = None
    ) -> list[Member]:
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(Member))
            await cur.execute(queries["members"], {"id": tenant_id, "user_id": user_id})
            return await cur.fetchall()

    async def add_member(
        self,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID,
        role: Role = "member",
        actor: uuid.UUID | None = None,
        *,
        credit_limit: int = UNLIMITED,
    ) -> Member:
        """Add an existing user (owners and admins; only owners add owners)."""

        async def work(conn: Conn) -> None:
            locked = await self._lock(conn, tenant_id, actor, MANAGERS, personal_ok=False)
            _may_grant(locked, role)
            await _may_give_limit(conn, locked, tenant_id, actor, credit_limit)
            params = {"id": tenant_id, "user_id": user_id, "role": role}
            cur = await conn.execute(queries["add_member"], params)
            if await cur.fetchone() is None:
                await _raise_missing_user_or_member(conn, user_id)
            await _set_limit(conn, tenant_id, user_id, credit_limit)

        await self._run(work)
        return await self.member(tenant_id, user_id)

    async def change_role(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID, role: Role, actor: uuid.UUID | None = None
    ) -> Member:
        """Change a member's role (admins manage admins and members; owners everyone)."""

        async def work(conn: Conn) -> None:
            locked = await self._lock(conn, tenant_id, actor, MANAGERS, personal_ok=False)
            current = await _role_of(conn, tenant_id, user_id)
            _may_grant(locked, current)
            _may_grant(locked, role)
            await conn.execute(
                queries["set_role"], {"id": tenant_id, "user_id": user_id, "role": role}
            )

        await self._run(work)
        return await self.member(tenant_id, user_id)

    async def remove_member(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID, actor: uuid.UUID | None = None
    ) -> None:
        """Remove a member, or leave (any member may remove itself). The member's pending
        holds on the pool are voided, and every debit of it that commits later is refused."""

        async def work(conn: Conn) -> None:
            leaving = actor is not None and actor == user_id
            locked = await self._lock(
                conn, tenant_id, actor, EVERYONE if leaving else MANAGERS, personal_ok=False
            )
            current = await _role_of(conn, tenant_id, user_id)
            if not leaving:
                _may_grant(locked, current)
            # The membership's trigger voids the member's holds (tenant_members_void_holds).
            await conn.execute(queries["remove_member"], {"id": tenant_id, "user_id": user_id})

        await self._run(work)

    async def transfer_ownership(
        self, tenant_id: uuid.UUID, new_owner: uuid.UUID, actor: uuid.UUID | None = None
    ) -> Organisation:
        """Make a member the owner of record; the acting owner stays on as an admin."""

        async def work(conn: Conn) -> None:
            await self._lock(conn, tenant_id, actor, {OWNER}, personal_ok=False)
            await _role_of(conn, tenant_id, new_owner)
            if not await _scalar(await conn.execute(queries["user_live"], {"user_id": new_owner})):
                raise e.MemberNotFound(
                    "ownership goes only to an active, not deleted user",
                    user_id=str(new_owner),
                )
            params = {"id": tenant_id, "user_id": new_owner, "role": OWNER}
            await conn.execute(queries["set_role"], params)
            await conn.execute(queries["set_owner"], params)
            if actor is not None and actor != new_owner:
                await conn.execute(
                    queries["set_role"], {"id": tenant_id, "user_id": actor, "role": ADMIN}
                )

        await self._run(work)
        return await self.get(tenant_id, actor)

    async def set_credit_limit(
        self,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID,
        credit_limit: int,
        actor: uuid.UUID | None = None,
    ) -> Member:
        """Set what a member may spend from the pool per period (-1 = unlimited). Lowering it
        below what was used stops further spending; nothing is taken back."""

        async def work(conn: Conn) -> None:
            locked = await self._lock(conn, tenant_id, actor, MANAGERS, personal_ok=False)
            target_role = await _role_of(conn, tenant_id, user_id)
            _may_grant(locked, target_role)
            if locked.actor_role == ADMIN and (user_id == actor or target_role == ADMIN):
                raise e.OrganisationPermissionDenied(
                    "an admin's limit is set by an owner", role=ADMIN
                )
            await _may_give_limit(conn, locked, tenant_id, actor, credit_limit)
            await _set_limit(conn, tenant_id, user_id, credit_limit)

        await self._run(work)
        return await self.member(tenant_id, user_id)

    # --- invitations -----------------------------------------------------------------------

    async def invite(
        self,
        tenant_id: uuid.UUID,
        email: str,
        role: InviteRole = "member",
        actor: uuid.UUID | None = None,
        *,
        credit_limit: int = UNLIMITED,
    ) -> IssuedInvitation:
        """Invite an address; a pending invitation to it is replaced (its token dies)."""
        address = normalise_email(email)
        if credit_limit < UNLIMITED:
            raise e.InvalidRequest("credit_limit must be -1 (unlimited) or more")
        issued = tokens.issue(INVITATION_PREFIX)

        async def work(conn: Conn) -> Invitation:
            locked = await self._lock(conn, tenant_id, actor, MANAGERS, personal_ok=False)
            await _may_give_limit(conn, locked, tenant_id, actor, credit_limit)
            params: dict[str, Any] = {"id": tenant_id, "email": address}
            cur = await conn.execute(queries["member_is_invitee"], params)
            if await _scalar(cur):
                raise e.AlreadyMember(email=address)
            await conn.execute(queries["revoke_pending"], params)
            params |= {
                "invitation_id": uuid7(),
                "role": role,
                "credit_limit": credit_limit,
                "actor": actor,
                "selector": issued.id,
                "secret_hash": issued.secret_hash,
                "ttl": self._ttl,
            }
            out = conn.cursor(row_factory=class_row(Invitation))
            await out.execute(queries["invite"], params)
            invitation = await out.fetchone()
            assert invitation is not None
            return invitation

        return IssuedInvitation(await self._run(work), issued.token)

    async def invitations(
        self, tenant_id: uuid.UUID, actor: uuid.UUID | None = None
    ) -> list[Invitation]:
        """The organisation's invitations, newest first (owners and admins)."""

        async def work(conn: Conn) -> list[Invitation]:
            await self._lock(conn, tenant_id, actor, MANAGERS)
            return await _invitations(conn, tenant_id)

        return await self._run(work)

    async def resend(
        self, tenant_id: uuid.UUID, invitation_id: uuid.UUID, actor: uuid.UUID | None = None
    ) -> IssuedInvitation:
        """A new token and expiry for a pending (or expired) invitation; the old token dies."""
        issued = tokens.issue(INVITATION_PREFIX)

        async def work(conn: Conn) -> Invitation:
            await self._lock(conn, tenant_id, actor, MANAGERS)
            row = await _invitation_for_update(conn, tenant_id, invitation_id)
            if row["status"] not in ("pending", "expired"):
                raise _closed(row)
            await conn.execute(
                queries["rotate"],
                {
                    "id": tenant_id,
                    "invitation_id": invitation_id,
                    "old_selector": row["selector"],
                    "selector": issued.id,
                    "secret_hash": issued.secret_hash,
                    "ttl": self._ttl,
                },
            )
            await _set_status(conn, tenant_id, invitation_id, "pending")
            return (await _invitations(conn, tenant_id, invitation_id))[0]

        return IssuedInvitation(await self._run(work), issued.token)

    async def revoke(
        self, tenant_id: uuid.UUID, invitation_id: uuid.UUID, actor: uuid.UUID | None = None
    ) -> Invitation:
        """Revoke a pending invitation; its token stops working (idempotent)."""

        async def work(conn: Conn) -> Invitation:
            await self._lock(conn, tenant_id, actor, MANAGERS)
            row = await _invitation_for_update(conn, tenant_id, invitation_id)
            if row["status"] == "accepted":
                raise e.InvitationUsed(invitation_id=str(invitation_id))
            await _set_status(conn, tenant_id, invitation_id, "revoked")
            return (await _invitations(conn, tenant_id, invitation_id))[0]

        return await self._run(work)

    async def accept(self, token: str, user_id: uuid.UUID) -> Member:
        """Accept an invitation as `user_id`, whose verified e-mail must be the invited one.
        Single use: of many concurrent accepts, one makes the membership."""
        parsed = tokens.parse(token, INVITATION_PREFIX)
        if parsed is None:
            raise e.InvitationNotFound()
        selector, secret = parsed

        async def work(conn: Conn) -> uuid.UUID:
            cur = await conn.execute(queries["route"], {"selector": selector})
            route = await cur.fetchone()
            if route is None:
                raise e.InvitationNotFound()
            tenant_id, invitation_id = route
            # The tenant first, then the invitation: the order every other change takes.
            locked = await self._lock(conn, tenant_id, None, EVERYONE, deleted_ok=True)
            row = await _invitation_for_update(conn, tenant_id, invitation_id)
            if row["selector"] != selector or not tokens.matches(secret, row["secret_hash"]):
                raise e.InvitationNotFound()
            if locked.deleted:
                raise e.OrganisationNotFound(tenant_id=str(tenant_id))
            if row["status"] != "pending":
                raise _closed(row)
            if row["invited_by"] is not None:
                # What the invitation gives is the inviter's to give only while it manages
                # the organisation: an admin removed or demoted since cannot get back in.
                by = {"id": tenant_id, "user_id": row["invited_by"]}
                inviter = await _scalar(await conn.execute(queries["member_role"], by))
                if inviter not in MANAGERS:
                    raise e.InvitationRevoked(
                        "whoever sent this invitation no longer manages the organisation",
                        invitation_id=str(invitation_id),
                    )
            params: dict[str, Any] = {"user_id": user_id, "email": row["email"]}
            if not await _scalar(await conn.execute(queries["verified_email"], params)):
                raise e.InvitationEmailMismatch()
            params |= {"id": tenant_id, "role": row["role"]}
            cur = await conn.execute(queries["add_member"], params)
            if await cur.fetchone() is None:
                await _raise_missing_user_or_member(conn, user_id)
            await _set_limit(conn, tenant_id, user_id, row["credit_limit"])
            await _set_status(conn, tenant_id, invitation_id, "accepted", accepted_by=user_id)
            return tenant_id  # type: ignore[no-any-return]

        tenant_id = await self._run(work)
        return await self.member(tenant_id, user_id)


async def _may_give_limit(
    conn: Conn, locked: _Locked, tenant_id: uuid.UUID, actor: uuid.UUID | None, limit: int
) -> None:
    """Owners (and the service) give any credit limit; an admin none above its own, and no
    unlimited one unless its own is (else two admins could lift each other's caps, or one
    add a second account of its own without any)."""
    if locked.actor_role != ADMIN or actor is None:
        return
    params = {"id": tenant_id, "user_id": actor}
    own = await _scalar(await conn.execute(queries["credit_limit_of"], params))
    if own is None or own == UNLIMITED:
        return
    if limit == UNLIMITED or limit > own:
        raise e.OrganisationPermissionDenied(
            f"an admin gives no credit limit above its own ({own})", role=ADMIN
        )


def _may_grant(locked: _Locked, role: str) -> None:
    """Only owners (and the service) give, take or touch the owner role."""
    if role == OWNER and locked.actor_role not in (None, OWNER):
        raise e.OrganisationPermissionDenied("only an owner may change owners", role=ADMIN)


async def _scalar(cur: Any) -> Any:
    row = await cur.fetchone()
    return None if row is None else row[0]


async def _role_of(conn: Conn, tenant_id: uuid.UUID, user_id: uuid.UUID) -> str:
    cur = await conn.execute(queries["member_role"], {"id": tenant_id, "user_id": user_id})
    role = await _scalar(cur)
    if role is None:
        raise e.MemberNotFound(user_id=str(user_id))
    return str(role)


async def _raise_missing_user_or_member(conn: Conn, user_id: uuid.UUID) -> None:
    if not await _scalar(await conn.execute(queries["user_exists"], {"user_id": user_id})):
        raise e.UserNotFound(user_id=str(user_id))
    raise e.AlreadyMember(user_id=str(user_id))


async def _set_limit(conn: Conn, tenant_id: uuid.UUID, user_id: uuid.UUID, limit: int) -> None:
    params = {"id": tenant_id, "user_id": user_id, "credit_limit": limit}
    await conn.execute(queries["set_limit"], params)


async def _invitations(
    conn: Conn, tenant_id: uuid.UUID, invitation_id: uuid.UUID | None = None
) -> list[Invitation]:
    cur = conn.cursor(row_factory=class_row(Invitation))
    await cur.execute(queries["invitations"], {"id": tenant_id, "invitation_id": invitation_id})
    return await cur.fetchall()


async def _invitation_for_update(
    conn: Conn, tenant_id: uuid.UUID, invitation_id: uuid.UUID
) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    params = {"id": tenant_id, "invitation_id": invitation_id}
    await cur.execute(queries["invitation_for_update"], params)
    row = await cur.fetchone()
    if row is None:
        raise e.InvitationNotFound(invitation_id=str(invitation_id))
    if row["expired"]:
        row["status"] = "expired"
    return row


async def _set_status(
    conn: Conn,
    tenant_id: uuid.UUID,
    invitation_id: uuid.UUID,
    status: str,
    *,
    accepted_by: uuid.UUID | None = None,
) -> None:
    params = {
        "id": tenant_id,
        "invitation_id": invitation_id,
        "status": status,
        "accepted_by": accepted_by,
    }
    await conn.execute(queries["set_invitation_status"], params)


def _closed(row: dict[str, Any]) -> e.TollhouseError:
    """The error for an invitation that can no longer be accepted or resent."""
    kinds: dict[str, type[e.TollhouseError]] = {
        "accepted": e.InvitationUsed,
        "revoked": e.InvitationRevoked,
        "expired": e.InvitationExpired,
    }
    return kinds[row["status"]](invitation_id=str(row["id"]))
