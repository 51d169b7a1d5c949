"""Users, their e-mails, roles and preferences (the service role's view), plus the reads and
profile updates an end user makes as the end-user role."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

from tollhouse import errors as e
from tollhouse.db.pool import Conn, Database
from tollhouse.db.queries import Queries
from tollhouse.identity.emails import normalise_email
from tollhouse.identity.hooks import IdentityHooks, NoHooks
from tollhouse.identity.records import EmailPreferences, User
from tollhouse.ids import uuid7

queries = Queries("tollhouse.identity", "queries.sql")

CONSTRAINTS: Mapping[str, type[e.TollhouseError]] = {
    "email_routes_pkey": e.EmailTaken,
    "user_emails_pkey": e.EmailTaken,
    "users_username_key": e.UsernameTaken,
    "users_username_check": e.InvalidProfile,
    "users_display_name_check": e.InvalidProfile,
    "users_first_name_check": e.InvalidProfile,
    "users_last_name_check": e.InvalidProfile,
    "users_avatar_url_check": e.InvalidProfile,
    "users_metadata_check": e.InvalidProfile,
    "users_status_check": e.InvalidProfile,
    "users_plan_override_check": e.InvalidProfile,
    "user_roles_role_check": e.InvalidRequest,
    "user_emails_one_primary_key": e.Conflict,
    # Soft-deleting the sole live owner of an organisation (migration 0025).
    "tenant_members_owner_check": e.LastOwner,
}

PROFILE_FIELDS = ("display_name", "first_name", "last_name", "username", "avatar_url")
ADMIN_FIELDS = (*PROFILE_FIELDS, "status", "is_internal", "plan_override", "metadata")
ROLES = ("superuser", "admin", "user", "member")


async def insert_user(
    conn: Conn,
    *,
    email: str | None,
    verified: bool,
    via: str,
    display_name: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    password_hash: str | None = None,
) -> uuid.UUID:
    """Create a user with its personal tenant in the caller's transaction."""
    user_id = uuid7()
    await conn.execute(
        queries["create_user"],
        {
            "id": user_id,
            "tenant_id": uuid7(),
            "email": email,
            "verified": verified,
            "via": via,
            "display_name": display_name,
            "first_name": first_name,
            "last_name": last_name,
            "password_hash": password_hash,
        },
    )
    return user_id


async def load_user(conn: Conn, user_id: uuid.UUID, *, include_deleted: bool = False) -> User:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(queries["user"], {"id": user_id, "include_deleted": include_deleted})
    row = await cur.fetchone()
    if row is None:
        raise e.UserNotFound(f"no user {user_id}", user_id=str(user_id))
    return User.from_row(row)


async def record_event(conn: Conn, user_id: uuid.UUID, kind: str, **detail: Any) -> None:
    await conn.execute(
        queries["record_event"],
        {"user_id": user_id, "id": uuid7(), "kind": kind, "detail": Jsonb(detail)},
    )


def _changes(fields: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = set(fields) - set(allowed)
    if unknown:
        raise e.InvalidProfile(f"cannot change {', '.join(sorted(unknown))}")
    params: dict[str, Any] = dict.fromkeys(allowed)
    params.update(fields)
    if "metadata" in params and params["metadata"] is not None:
        params["metadata"] = Jsonb(params["metadata"])
    elif "metadata" in fields:
        raise e.InvalidProfile("metadata must be an object", field="metadata")
    params["fields"] = list(fields)
    return params


class UserService:
    """Users as the service manages them."""

    def __init__(self, db: Database, hooks: IdentityHooks | None = None) -> None:
        self._db = db
        self._hooks: IdentityHooks = hooks or NoHooks()

    async def create(
        self,
        *,
        email: str | None = None,
        display_name: str | None = None,
        password_hash: str | None = None,
        email_verified: bool = False,
        via: str = "admin",
    ) -> User:
        """A new user (with a personal tenant); the e-mail, if any, becomes its primary."""
        normalised = normalise_email(email) if email is not None else None

        async def work(conn: Conn) -> User:
            user_id = await insert_user(
                conn,
                email=normalised,
                verified=email_verified,
                via=via,
                display_name=display_name,
                password_hash=password_hash,
            )
            return await load_user(conn, user_id)

        user = await self._db.transaction(work, constraints=CONSTRAINTS)
        await self._hooks.on_user_created(user.id, via)
        return user

    async def get(self, user_id: uuid.UUID, *, include_deleted: bool = False) -> User:
        async with self._db.connection() as conn:
            return await load_user(conn, user_id, include_deleted=include_deleted)

    async def find_by_email(self, email: str) -> User | None:
        normalised = normalise_email(email)
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["user_id_by_email"], {"email": normalised})
            row = await cur.fetchone()
            if row is None:
                return None
            try:
                return await load_user(conn, row[0])
            except e.UserNotFound:
                return None

    async def find_by_identity(self, provider: str, subject: str) -> User | None:
        async with self._db.connection() as conn:
            cur = await conn.execute(
                queries["user_id_by_identity"], {"provider": provider, "subject": subject}
            )
            row = await cur.fetchone()
            return None if row is None else await load_user(conn, row[0])

    async def update(self, user_id: uuid.UUID, fields: Mapping[str, Any]) -> User:
        """Change profile and admin fields; only the keys given change."""
        params = _changes(fields, ADMIN_FIELDS)
        params["id"] = user_id

        async def work(conn: Conn) -> User:
            cur = await conn.execute(queries["update_user"], params)
            if await cur.fetchone() is None:
                raise e.UserNotFound(f"no user {user_id}", user_id=str(user_id))
            return await load_user(conn, user_id)

        return await self._db.transaction(work, constraints=CONSTRAINTS)

    async def delete(self, user_id: uuid.UUID) -> User:
        """Soft delete: sessions end, sign-in stops; `restore` undoes it."""
        return await self._set_deleted(user_id, "soft_delete_user")

    async def restore(self, user_id: uuid.UUID) -> User:
        return await self._set_deleted(user_id, "restore_user")

    async def _set_deleted(self, user_id: uuid.UUID, query: str) -> User:
        async def work(conn: Conn) -> User:
            cur = await conn.execute(queries[query], {"id": user_id})
            if await cur.fetchone() is None:
                raise e.UserNotFound(f"no user {user_id} to change", user_id=str(user_id))
            return await load_user(conn, user_id, include_deleted=True)

        return await self._db.transaction(work, constraints=CONSTRAINTS)

    async def add_email(
        self, user_id: uuid.UUID, email: str, *, verified: bool = False, via: str = "admin"
    ) -> User:
        normalised = normalise_email(email)

        async def work(conn: Conn) -> User:
            await load_user(conn, user_id)
            await conn.execute(queries["lock_user"], {"user_id": user_id})
            await conn.execute(
                queries["add_email"],
                {"user_id": user_id, "email": normalised, "verified": verified, "via": via},
            )
            return await load_user(conn, user_id)

        return await self._db.transaction(work, constraints=CONSTRAINTS)

    async def remove_email(self, user_id: uuid.UUID, email: str) -> User:
        """Remove a non-primary address (it becomes free for others)."""
        normalised = normalise_email(email)

        async def work(conn: Conn) -> User:
            is_primary, _ = await _email_state(conn, user_id, normalised)
            if is_primary:
                raise e.PrimaryEmailRequired()
            await conn.execute(queries["remove_email"], {"user_id": user_id, "email": normalised})
            return await load_user(conn, user_id)

        return await self._db.transaction(work)

    async def make_primary(self, user_id: uuid.UUID, email: str) -> User:
        """Make a verified address the primary one (the old primary stays, as secondary)."""
        normalised = normalise_email(email)

        async def work(conn: Conn) -> User:
            _, verified = await _email_state(conn, user_id, normalised)
            if not verified:
                raise e.EmailNotVerified()
            await conn.execute(queries["make_primary"], {"user_id": user_id, "email": normalised})
            return await load_user(conn, user_id)

        return await self._db.transaction(work, constraints=CONSTRAINTS)

    async def set_role(self, user_id: uuid.UUID, role: str, *, granted: bool = True) -> User:
        if role not in ROLES:
            raise e.InvalidRequest(f"role must be one of {', '.join(ROLES)}", field="role")

        async def work(conn: Conn) -> User:
            await load_user(conn, user_id)
            query = "grant_role" if granted else "revoke_role"
            await conn.execute(queries[query], {"user_id": user_id, "role": role})
            return await load_user(conn, user_id)

        return await self._db.transaction(work, constraints=CONSTRAINTS)

    async def preferences(self, user_id: uuid.UUID) -> EmailPreferences:
        async with self._db.connection() as conn:
            return await _read_preferences(conn, user_id)

    async def update_preferences(
        self, user_id: uuid.UUID, changes: Mapping[str, bool]
    ) -> EmailPreferences:
        async with self._db.connection() as conn:
            return await _update_preferences(conn, user_id, changes)


async def _email_state(conn: Conn, user_id: uuid.UUID, email: str) -> tuple[bool, bool]:
    """(is_primary, verified) of one of the user's addresses, with the user locked."""
    await conn.execute(queries["lock_user"], {"user_id": user_id})
    cur = await conn.execute(queries["email_state"], {"user_id": user_id})
    for address, is_primary, verified in await cur.fetchall():
        if address == email:
            return is_primary, verified
    raise e.EmailNotFound(f"the user has no address {email}")


async def _read_preferences(conn: Conn, user_id: uuid.UUID) -> EmailPreferences:
    cur = conn.cursor(row_factory=class_row(EmailPreferences))
    await cur.execute(queries["preferences"], {"user_id": user_id})
    prefs = await cur.fetchone()
    if prefs is None:
        raise e.UserNotFound(f"no user {user_id}", user_id=str(user_id))
    return prefs


async def _update_preferences(
    conn: Conn, user_id: uuid.UUID, changes: Mapping[str, bool]
) -> EmailPreferences:
    allowed = ("marketing", "product_updates", "payment_receipts")
    unknown = set(changes) - set(allowed)
    if unknown:
        raise e.InvalidRequest(f"unknown preference {', '.join(sorted(unknown))}")
    params: dict[str, Any] = {name: changes.get(name) for name in allowed}
    params["user_id"] = user_id
    cur = conn.cursor(row_factory=class_row(EmailPreferences))
    await cur.execute(queries["update_preferences"], params)
    prefs = await cur.fetchone()
    if prefs is None:
        raise e.UserNotFound(f"no user {user_id}", user_id=str(user_id))
    return prefs


class SelfService:
    """What an end user reads and changes about itself, as the end-user role under RLS."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def me(self, user_id: uuid.UUID) -> User:
        async with self._db.as_end_user(user_id) as conn:
            return await load_user(conn, user_id)

    async def update_profile(self, user_id: uuid.UUID, fields: Mapping[str, Any]) -> User:
        params = _changes(fields, PROFILE_FIELDS)
        async with self._db.as_end_user(user_id, CONSTRAINTS) as conn:
            cur = await conn.execute(queries["update_own_profile"], params)
            if await cur.fetchone() is None:
                raise e.UserNotFound()
            return await load_user(conn, user_id)

    async def preferences(self, user_id: uuid.UUID) -> EmailPreferences:
        async with self._db.as_end_user(user_id) as conn:
            return await _read_preferences(conn, user_id)

    async def update_preferences(
        self, user_id: uuid.UUID, changes: Mapping[str, bool]
    ) -> EmailPreferences:
        async with self._db.as_end_user(user_id) as conn:
            return await _update_preferences(conn, user_id, changes)
