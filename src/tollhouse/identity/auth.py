"""Signing in: passwords, Google and Apple ID tokens, sessions, single-use tokens, linking.

The merge rules (DATA_MODEL.md, RELIABILITY.md §4) on an ID-token sign-in:
1. a known (provider, subject) signs in its user, with or without an e-mail claim;
2. else, when the provider vouches for the address and a user holds it verified, the
   identity is linked to that user — unless that user already has another identity of the
   same provider (a different account there: explicit linking required);
3. a user holding the address *unverified* through a password sign-up loses that password
   and every session, and the identity takes the account over (pre-hijack mitigation);
4. else a new user. An address the provider does not vouch for is never linked, never
   stored as a user's address, and if someone holds it the sign-in is refused with
   `account_exists_link_required`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from psycopg.rows import class_row, dict_row

from tollhouse import errors as e
from tollhouse.db.pool import Conn, Database
from tollhouse.db.queries import Queries
from tollhouse.identity import tokens
from tollhouse.identity.apple import AppleNotificationResult, receive_apple_notification
from tollhouse.identity.config import IdentityConfig
from tollhouse.identity.emails import normalise_email, provider_email
from tollhouse.identity.hooks import IdentityHooks, NoHooks
from tollhouse.identity.oidc import OidcVerifier, VerifiedIdentity
from tollhouse.identity.passwords import PasswordHasher, check_password_rules
from tollhouse.identity.records import IssuedUserToken, Session, SignIn, User
from tollhouse.identity.users import CONSTRAINTS, insert_user, load_user, record_event
from tollhouse.identity.users import queries as user_queries

queries = Queries("tollhouse.identity", "auth.sql")
log = structlog.get_logger(__name__)

SESSION_PREFIX = "ths"
VERIFY_PREFIX = "thv"
RESET_PREFIX = "thr"
LINK_NONCE_PREFIX = "thl"

_AUTH_CONSTRAINTS = {**CONSTRAINTS, "identity_routes_pkey": e.IdentityTaken}


@dataclass(frozen=True)
class _Outcome:
    user_id: uuid.UUID
    created: bool
    linked: bool
    claimed: bool = False


class AuthService:
    """Every way of signing in, and what sessions and tokens do afterwards."""

    def __init__(
        self,
        db: Database,
        config: IdentityConfig | None = None,
        hooks: IdentityHooks | None = None,
    ) -> None:
        self._db = db
        self.config = config or IdentityConfig()
        self.hasher = PasswordHasher(self.config.password_profile, self.config.password_concurrency)
        self.oidc = OidcVerifier(self.config.providers())
        self._hooks: IdentityHooks = hooks or NoHooks()
        self._housekeeping: asyncio.Task[None] | None = None
        #: Share of sign-ins that start a housekeeping run in the background.
        self.housekeeping_chance = 0.01

    # --- passwords ---------------------------------------------------------------------------

    async def sign_up(
        self, email: str, password: str, display_name: str | None = None
    ) -> tuple[SignIn, IssuedUserToken]:
        """A new password account with an unverified address, a session and a token to
        verify the address (the app delivers it)."""
        normalised = normalise_email(email)
        check_password_rules(password)
        password_hash = await self.hasher.hash(password)

        async def work(conn: Conn) -> tuple[SignIn, IssuedUserToken]:
            user_id = await insert_user(
                conn,
                email=normalised,
                verified=False,
                via="email:password",
                display_name=display_name,
                password_hash=password_hash,
            )
            token = await self._issue(
                conn,
                user_id,
                "verify_email",
                VERIFY_PREFIX,
                normalised,
                self.config.verify_email_ttl_seconds,
            )
            sign_in = await self._session(conn, user_id, "signup", created=True, linked=False)
            return sign_in, token

        result = await self._db.transaction(work, constraints=CONSTRAINTS)
        await self._hooks.on_user_created(result[0].user.id, "email:password")
        return result

    async def sign_in_password(self, email: str, password: str, client_ip: str | None) -> SignIn:
        """Unknown address and wrong password answer alike, after the same Argon2 work.

        Every attempt first takes a slot in the account's window and, when the app names its
        end user's address, in that address's window; a success gives the account its slots
        back and the address its one slot, so the address limit counts failures only.
        """
        normalised = normalise_email(email)
        if len(password) > 1024:
            raise e.InvalidCredentials()
        account_key = f"account:{normalised}"
        ip_key = f"ip:{client_ip}" if client_ip else None
        await self._take_attempt([account_key] + ([ip_key] if ip_key else []))
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["password_user"], {"email": normalised})
            row = await cur.fetchone()
        stored_hash = row[1] if row is not None else None
        verification = await self.hasher.verify(stored_hash, password)
        if not verification.ok or row is None or stored_hash is None:
            raise e.InvalidCredentials()
        user_id, _, status, deleted, changed_at = row
        if deleted or status != "active":
            raise e.AccountDisabled()

        async def work(conn: Conn) -> SignIn:
            cur = await conn.execute(
                queries["confirm_password_unchanged"],
                {"user_id": user_id, "changed_at": changed_at},
            )
            still = await cur.fetchone()
            if still is None or not still[0]:
                raise e.InvalidCredentials()  # changed, reset or claimed meanwhile
            await conn.execute(queries["clear_attempts"], {"key": account_key})
            if ip_key is not None:
                await conn.execute(
                    queries["refund_attempt"],
                    {"key": ip_key, "window": self.config.signin_window_seconds},
                )
            if verification.needs_rehash:
                await conn.execute(
                    queries["rehash_password"],
                    {
                        "user_id": user_id,
                        "old_hash": stored_hash,
                        "new_hash": await self.hasher.hash(password),
                    },
                )
            return await self._session(conn, user_id, "password", created=False, linked=False)

        sign_in = await self._db.transaction(work)
        self._maybe_housekeep()
        return sign_in

    async def _take_attempt(self, keys: list[str]) -> None:
        """One slot in each key's throttling window, or `TooManySignInAttempts`."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                queries["signin_attempt"],
                {
                    "keys": keys,
                    "limit": self.config.signin_limit,
                    "window": self.config.signin_window_seconds,
                },
            )
            allowed = await cur.fetchone()
        if allowed is None or not allowed[0]:
            raise e.TooManySignInAttempts()

    async def _check_password(self, user_id: uuid.UUID, password: str) -> datetime | None:
        """For re-authentication and password changes: throttled like sign-in. Returns the
        `password_changed_at` of the password it verified."""
        await self._take_attempt([f"user:{user_id}"])
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["user_password"], {"user_id": user_id})
            row = await cur.fetchone()
        verified = await self.hasher.verify(row[0] if row else None, password)
        if row is None or not verified.ok:
            raise e.InvalidCredentials("the password is wrong")
        async with self._db.connection() as conn:
            await conn.execute(queries["clear_attempts"], {"key": f"user:{user_id}"})
        changed_at: datetime | None = row[1]
        return changed_at

    async def change_password(self, session: Session, current: str, new: str) -> None:
        """Needs the current password; every other session of the user ends.

        The new hash is written only if, under the user's row lock, the password verified is
        still the current one and the session still open: Argon2 runs outside the
        transaction, and a claim of the account by its address's owner, a reset or another
        change that commits meanwhile must win (else the change in flight would put a
        password the claim removed back on the account)."""
        check_password_rules(new)
        changed_at = await self._check_password(session.user_id, current)
        new_hash = await self.hasher.hash(new)

        async def work(conn: Conn) -> None:
            cur = await conn.execute(
                queries["confirm_password_unchanged"],
                {"user_id": session.user_id, "changed_at": changed_at},
            )
            still = await cur.fetchone()
            if still is None or not still[0]:
                raise e.InvalidCredentials("the password changed meanwhile")
            # A statement of its own, after the lock: it sees a revocation committed while
            # the lock was awaited.
            cur = await conn.execute(queries["session_open"], {"id": session.id})
            if await cur.fetchone() is None:
                raise e.InvalidSession()
            await conn.execute(
                queries["set_password"],
                {"user_id": session.user_id, "password_hash": new_hash, "keep_session": session.id},
            )

        await self._db.transaction(work)
        await self._hooks.on_password_changed(session.user_id)

    async def request_password_reset(self, email: str) -> IssuedUserToken | None:
        """A reset token for the app to deliver, or None when the address reaches no account
        it proves (unknown, or unverified beside other ways in). The app must answer its
        user the same way in every case."""
        normalised = normalise_email(email)

        async def work(conn: Conn) -> IssuedUserToken | None:
            cur = await conn.execute(queries["reset_target"], {"email": normalised})
            row = await cur.fetchone()
            if row is None:
                return None
            return await self._issue(
                conn,
                row[0],
                "reset_password",
                RESET_PREFIX,
                normalised,
                self.config.reset_password_ttl_seconds,
            )

        return await self._db.transaction(work)

    async def reset_password(self, token: str, new_password: str) -> User:
        """Sets the password, verifies the address the token went to, ends every session."""
        check_password_rules(new_password)
        new_hash = await self.hasher.hash(new_password)

        async def work(conn: Conn) -> User:
            user_id, email = await self._use_token(conn, token, "reset_password", RESET_PREFIX)
            await conn.execute(
                queries["set_password"],
                {"user_id": user_id, "password_hash": new_hash, "keep_session": None},
            )
            if email is not None:
                await conn.execute(
                    user_queries["mark_email_verified"], {"user_id": user_id, "email": email}
                )
                # The owner proved the mailbox: a guessing lock on it no longer applies.
                await conn.execute(queries["clear_attempts"], {"key": f"account:{email}"})
            return await load_user(conn, user_id)

        user = await self._db.transaction(work)
        await self._hooks.on_password_changed(user.id)
        return user

    # --- e-mail verification -----------------------------------------------------------------

    async def request_email_verification(self, user_id: uuid.UUID, email: str) -> IssuedUserToken:
        normalised = normalise_email(email)

        async def work(conn: Conn) -> IssuedUserToken:
            user = await load_user(conn, user_id)
            if normalised not in {a.email for a in user.emails}:
                raise e.EmailNotFound(f"the user has no address {normalised}")
            return await self._issue(
                conn,
                user_id,
                "verify_email",
                VERIFY_PREFIX,
                normalised,
                self.config.verify_email_ttl_seconds,
            )

        return await self._db.transaction(work)

    async def verify_email(self, token: str) -> User:
        """Marks the address verified. Proving ownership ends every existing session, so a
        session someone opened on a pre-created account does not survive the claim."""

        async def work(conn: Conn) -> tuple[User, str]:
            user_id, email = await self._use_token(conn, token, "verify_email", VERIFY_PREFIX)
            assert email is not None
            cur = await conn.execute(
                "UPDATE tollhouse.user_emails SET verified = true, verified_at = now()"
                " WHERE user_id = %(user_id)s AND email = %(email)s AND NOT verified"
                " RETURNING email",
                {"user_id": user_id, "email": email},
            )
            if await cur.fetchone() is not None:
                await conn.execute(queries["revoke_sessions"], {"user_id": user_id})
                await record_event(conn, user_id, "email_verified", email=email)
            return await load_user(conn, user_id), email

        user, email = await self._db.transaction(work)
        await self._hooks.on_email_verified(user.id, email)
        return user

    # --- Google and Apple --------------------------------------------------------------------

    async def sign_in_oidc(
        self,
        provider: str,
        id_token: str,
        nonce: str | None = None,
        *,
        first_name: str | None = None,
        last_name: str | None = None,
    ) -> SignIn:
        """Sign in, link or sign up with a provider's ID token (rules in the module doc)."""
        identity = await self.oidc.verify(provider, id_token, nonce)

        async def work(conn: Conn) -> tuple[SignIn, bool]:
            await self._consume_nonce(conn, identity)
            outcome = await self._resolve(conn, identity, first_name, last_name)
            sign_in = await self._session(
                conn, outcome.user_id, identity.provider, outcome.created, outcome.linked
            )
            return sign_in, outcome.claimed

        try:
            sign_in, claimed = await self._db.transaction(work, constraints=_AUTH_CONSTRAINTS)
        except (e.IdentityTaken, e.EmailTaken):
            # Two first sign-ins of one identity (and address) raced; the loser now finds
            # the identity linked and signs in to it.
            sign_in, claimed = await self._db.transaction(work, constraints=_AUTH_CONSTRAINTS)
        self._maybe_housekeep()
        if sign_in.created:
            await self._hooks.on_user_created(sign_in.user.id, identity.provider)
        if sign_in.linked or sign_in.created:
            await self._hooks.on_identity_linked(sign_in.user.id, identity.provider)
        if claimed:
            await self._hooks.on_account_claimed(sign_in.user.id, identity.provider)
        return sign_in

    async def _consume_nonce(self, conn: Conn, identity: VerifiedIdentity) -> None:
        if identity.nonce_hash is None:
            return
        cur = await conn.execute(
            queries["remember_nonce"],
            {
                "provider": identity.provider,
                "nonce_hash": identity.nonce_hash,
                "expires_at": identity.expires_at,
            },
        )
        if await cur.fetchone() is None:
            raise e.NonceReplayed()

    async def _resolve(
        self,
        conn: Conn,
        identity: VerifiedIdentity,
        first_name: str | None,
        last_name: str | None,
    ) -> _Outcome:
        known = await self._known_identity(conn, identity)
        if known is not None:  # rule 1
            return known

        email = provider_email(identity.email)
        holder = None
        if email is not None:
            holder = await self._email_holder(conn, email)
            # The row lock may have waited for a concurrent first sign-in of this very
            # identity: look again now that it committed.
            known = await self._known_identity(conn, identity) if holder else None
            if known is not None:
                return known
        if holder is not None and not identity.email_verified:
            raise e.AccountExistsLinkRequired()  # never link on an unverified address
        if holder is not None and holder["verified"]:  # rule 2
            if identity.provider in holder["providers"]:
                raise e.AccountExistsLinkRequired()  # another account at the same provider
            if not holder["active"]:
                raise e.AccountDisabled()
            # A new way into an existing account ends the sessions opened before it.
            await conn.execute(
                queries["revoke_other_sessions"], {"user_id": holder["user_id"], "keep": None}
            )
            await self._link(conn, holder["user_id"], identity)
            return _Outcome(holder["user_id"], created=False, linked=True)
        if holder is not None:
            # (email_owner locked the holder's user row: users first, as everywhere.)
            # Only an account the address is the whole of: its sole address, never verified,
            # no identity. Anything else there could still let its maker in.
            claimable = (
                holder["active"]
                and not holder["providers"]
                and holder["verified_addresses"] == 0
                and holder["other_addresses"] == 0
            )
            if claimable:  # rule 3: take over a password account that never proved anything
                await conn.execute(
                    queries["claim_unverified_account"],
                    {"user_id": holder["user_id"], "email": email},
                )
                await record_event(
                    conn,
                    holder["user_id"],
                    "account_claimed",
                    provider=identity.provider,
                    email=email,
                    password_removed=holder["has_password"],
                )
                await self._link(conn, holder["user_id"], identity)
                return _Outcome(holder["user_id"], created=False, linked=True, claimed=True)
            # The holder signs in some other proven way (or is disabled): taking the account
            # over would share it with them. The unverified address moves instead.
            cur = await conn.execute(
                queries["detach_unverified_email"], {"user_id": holder["user_id"], "email": email}
            )
            if await cur.fetchone() is None:
                # Verified since it was read (the holder's lock makes this unreachable; it
                # must never leave the address with two users).
                raise e.AccountExistsLinkRequired()
            await conn.execute(queries["promote_primary"], {"user_id": holder["user_id"]})
            await record_event(
                conn, holder["user_id"], "email_detached", provider=identity.provider, email=email
            )
        # rule 4: a new user; only an address the provider vouches for becomes its e-mail
        display = " ".join(p for p in (first_name, last_name) if p) or identity.name
        user_id = await insert_user(
            conn,
            email=email if identity.email_verified else None,
            verified=True,
            via=identity.provider,
            display_name=display[:200] if display else None,
            first_name=first_name[:100] if first_name else None,
            last_name=last_name[:100] if last_name else None,
        )
        await self._link(conn, user_id, identity)
        return _Outcome(user_id, created=True, linked=False)

    async def _email_holder(self, conn: Conn, email: str) -> dict[str, Any] | None:
        """Who holds the address and what else it signs in with, read while its user's row
        is locked. The statement that takes the lock reads with the snapshot it started
        with, older than whatever committed while it waited (another identity linked, the
        address verified, one added): so the holder is read again by a statement of its
        own, until two reads name the same user (the address may have moved meanwhile)."""
        locked = None
        while True:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(queries["email_owner"], {"email": email})
            holder = await cur.fetchone()
            if holder is None or holder["user_id"] == locked:
                return holder
            locked = holder["user_id"]

    async def _known_identity(self, conn: Conn, identity: VerifiedIdentity) -> _Outcome | None:
        """Rule 1: the user this (provider, subject) is linked to, if any."""
        key = {"provider": identity.provider, "subject": identity.subject}
        cur = await conn.execute(queries["identity_owner"], key)
        owner = await cur.fetchone()
        if owner is None:
            return None
        await self._check_active(conn, owner[0])
        await conn.execute(
            queries["touch_identity"],
            {
                **key,
                "user_id": owner[0],
                "email": identity.email,
                "email_verified": identity.email_verified,
            },
        )
        return _Outcome(owner[0], created=False, linked=False)

    async def _link(self, conn: Conn, user_id: uuid.UUID, identity: VerifiedIdentity) -> None:
        await conn.execute(
            queries["link_identity"],
            {
                "user_id": user_id,
                "provider": identity.provider,
                "subject": identity.subject,
                "email": identity.email,
                "email_verified": identity.email_verified,
                "is_private_email": identity.is_private_email,
            },
        )
        await record_event(conn, user_id, "identity_linked", provider=identity.provider)

    async def _check_active(self, conn: Conn, user_id: uuid.UUID) -> None:
        user = await load_user(conn, user_id, include_deleted=True)
        if user.deleted_at is not None or user.status != "active":
            raise e.AccountDisabled()

    async def link_identity(
        self, session: Session, provider: str, id_token: str, nonce: str | None = None
    ) -> User:
        """Explicit linking by a user who signed in within the last few minutes, on an
        account that has proven something: a verified address or an identity already. (An
        unverified sign-up could otherwise plant its maker's identity in an account its
        address's real owner later claims.) The user's other sessions end."""
        await self._require_recent(session)
        if nonce is None and self.config.link_nonce_required:
            raise e.LinkNonceRequired()
        identity = await self.oidc.verify(provider, id_token, nonce)

        async def work(conn: Conn) -> User:
            cur = await conn.execute(queries["credentials"], {"user_id": session.user_id})
            proof = await cur.fetchone()
            if proof is None:
                raise e.UserNotFound()
            if proof[1] == 0 and proof[2] == 0:
                raise e.VerifiedEmailRequired()
            if nonce is not None:
                await self._use_link_nonce(conn, session, nonce)
            await self._consume_nonce(conn, identity)
            cur = await conn.execute(
                queries["identity_owner"],
                {"provider": identity.provider, "subject": identity.subject},
            )
            owner = await cur.fetchone()
            if owner is not None and owner[0] != session.user_id:
                raise e.IdentityTaken()
            if owner is None:
                await self._link(conn, session.user_id, identity)
                await conn.execute(
                    queries["revoke_other_sessions"],
                    {"user_id": session.user_id, "keep": session.id},
                )
            return await load_user(conn, session.user_id)

        user = await self._db.transaction(work, constraints=_AUTH_CONSTRAINTS)
        await self._hooks.on_identity_linked(user.id, identity.provider)
        return user

    async def link_nonce(self, session: Session) -> tuple[str, datetime]:
        """A nonce for the ID token of an explicit link by this session, and when it expires:
        the app puts it in the provider's sign-in request (Apple's native flows: its
        SHA-256) and sends it back with the token. It is a token whose selector is its user
        (`thl_<user>.<secret>`), so a nonce given to anyone else's session is told from one
        the app made itself."""
        issued = tokens.issue(LINK_NONCE_PREFIX, selector=session.user_id)
        async with self._db.connection() as conn:
            cur = await conn.execute(
                queries["issue_link_nonce"],
                {
                    "user_id": session.user_id,
                    "nonce_hash": issued.secret_hash,
                    "session_id": session.id,
                    "ttl": self.config.link_nonce_ttl_seconds,
                },
            )
            row = await cur.fetchone()
        assert row is not None
        expires_at: datetime = row[0]
        return issued.token, expires_at

    async def _use_link_nonce(self, conn: Conn, session: Session, nonce: str) -> None:
        parsed = tokens.parse(nonce, LINK_NONCE_PREFIX)
        if parsed is None:
            if nonce.startswith(f"{LINK_NONCE_PREFIX}_"):
                raise e.LinkNonceInvalid()  # ours in form, but not one we could have made
            if self.config.link_nonce_required:  # not one of ours: a nonce the app made
                raise e.LinkNonceRequired()
            return
        owner, secret = parsed
        cur = await conn.execute(
            queries["use_link_nonce"],
            {"user_id": owner, "nonce_hash": tokens.digest(secret), "session_id": session.id},
        )
        row = await cur.fetchone()
        if row is None or not row[0]:
            raise e.LinkNonceInvalid()  # another session's, used, expired, or never issued

    async def receive_apple_notification(self, token: str) -> AppleNotificationResult:
        """A Sign in with Apple server-to-server notification (`tollhouse.identity.apple`)."""
        return await receive_apple_notification(self._db, self.oidc, token)

    async def unlink_identity(self, user_id: uuid.UUID, provider: str, subject: str) -> User:
        """Refused when it would leave the user no way to sign in."""

        async def work(conn: Conn) -> User:
            cur = await conn.execute(queries["credentials"], {"user_id": user_id})
            row = await cur.fetchone()
            if row is None:
                raise e.UserNotFound()
            password_usable, identities, _ = row
            cur = await conn.execute(
                queries["unlink_identity"],
                {"user_id": user_id, "provider": provider, "subject": subject},
            )
            if await cur.fetchone() is None:
                raise e.IdentityNotFound()
            if not password_usable and identities <= 1:
                raise e.LastCredential()
            await record_event(conn, user_id, "identity_unlinked", provider=provider)
            return await load_user(conn, user_id)

        return await self._db.transaction(work)

    def _maybe_housekeep(self) -> None:
        """Now and then, housekeeping in the background: never in a request's way, and
        never more than one run at a time."""
        if self._housekeeping is not None and not self._housekeeping.done():
            return
        if random.random() >= self.housekeeping_chance:  # noqa: S311 - not security-relevant
            return
        self._housekeeping = asyncio.create_task(self._housekeep_quietly())

    async def close(self) -> None:
        """Stop background work (the composition root calls it before the pool closes)."""
        if self._housekeeping is not None and not self._housekeeping.done():
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping

    async def _housekeep_quietly(self) -> None:
        try:
            await self.housekeeping()
        except e.TollhouseError as exc:
            log.warning("identity_housekeeping_failed", error=exc.message)

    async def housekeeping(self) -> None:
        """Forget used nonces past their token's expiry and throttling windows long closed.
        Sign-ins call it now and then; an operator may call it on a schedule."""
        async with self._db.connection() as conn:
            await conn.execute(queries["forget_expired_nonces"])
            await conn.execute(queries["forget_expired_link_nonces"])
            await conn.execute(
                queries["forget_old_attempts"], {"window": self.config.signin_window_seconds}
            )

    # --- sessions ----------------------------------------------------------------------------

    async def authenticate(self, session_token: str) -> Session:
        """The live session behind a token, or `InvalidSession`."""
        parsed = tokens.parse(session_token, SESSION_PREFIX)
        if parsed is None:
            raise e.InvalidSession()
        session_id, secret = parsed
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(queries["session"], {"id": session_id})
            row = await cur.fetchone()
            if row is None or not tokens.matches(secret, row.pop("secret_hash")):
                raise e.InvalidSession()
            await conn.execute(queries["touch_session"], {"id": session_id})
        return Session(**row)

    async def reauthenticate(self, session: Session, password: str) -> Session:
        """Confirms the password, opening the window for sensitive actions again."""
        await self._check_password(session.user_id, password)
        async with self._db.connection() as conn:
            sessions = conn.cursor(row_factory=class_row(Session))
            await sessions.execute(queries["reauthenticate_session"], {"id": session.id})
            fresh = await sessions.fetchone()
        if fresh is None:
            raise e.InvalidSession()
        return fresh

    async def sign_out(self, session_token: str) -> None:
        """Ends the session; an unknown or already ended one is `InvalidSession`."""
        parsed = tokens.parse(session_token, SESSION_PREFIX)
        if parsed is None:
            raise e.InvalidSession()
        session = await self.authenticate(session_token)
        async with self._db.connection() as conn:
            await conn.execute(queries["revoke_session"], {"id": session.id})

    async def sessions(self, user_id: uuid.UUID) -> list[Session]:
        async with self._db.as_end_user(user_id) as conn:
            cur = conn.cursor(row_factory=class_row(Session))
            await cur.execute(user_queries["sessions_of"], {"user_id": user_id})
            return await cur.fetchall()

    async def _require_recent(self, session: Session) -> None:
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT %(at)s::timestamptz > now() - make_interval(secs => %(secs)s)",
                {"at": session.authenticated_at, "secs": self.config.reauth_seconds},
            )
            row = await cur.fetchone()
        if row is None or not row[0]:
            raise e.ReauthenticationRequired()

    async def _session(
        self, conn: Conn, user_id: uuid.UUID, method: str, created: bool, linked: bool
    ) -> SignIn:
        issued = tokens.issue(SESSION_PREFIX)
        cur = conn.cursor(row_factory=class_row(Session))
        await cur.execute(
            queries["create_session"],
            {
                "id": issued.id,
                "user_id": user_id,
                "secret_hash": issued.secret_hash,
                "method": method,
                "ttl": self.config.session_ttl_seconds,
            },
        )
        session = await cur.fetchone()
        assert session is not None
        await conn.execute(queries["seen"], {"user_id": user_id})
        user = await load_user(conn, user_id)
        return SignIn(issued.token, session, user, created, linked)

    # --- single-use tokens -------------------------------------------------------------------

    async def _issue(
        self,
        conn: Conn,
        user_id: uuid.UUID,
        purpose: str,
        prefix: str,
        email: str | None,
        ttl: int,
    ) -> IssuedUserToken:
        issued = tokens.issue(prefix)
        cur = await conn.execute(
            queries["create_token"],
            {
                "id": issued.id,
                "user_id": user_id,
                "purpose": purpose,
                "email": email,
                "secret_hash": issued.secret_hash,
                "ttl": ttl,
            },
        )
        row = await cur.fetchone()
        assert row is not None
        return IssuedUserToken(issued.token, row[0])

    async def _use_token(
        self, conn: Conn, token: str, purpose: str, prefix: str
    ) -> tuple[uuid.UUID, str | None]:
        parsed = tokens.parse(token, prefix)
        if parsed is None:
            raise e.InvalidToken()
        token_id, secret = parsed
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(queries["token"], {"id": token_id, "purpose": purpose})
        row: dict[str, Any] | None = await cur.fetchone()
        if row is None or not tokens.matches(secret, row["secret_hash"]):
            raise e.InvalidToken()
        if row["used"]:
            raise e.TokenUsed()
        if row["expired"]:
            raise e.TokenExpired()
        # The user's lock before the token's row, as a claim takes them: and a sign-in
        # deciding on an address as unverified finishes before a verification or reset
        # through that address changes it.
        await conn.execute(queries["lock_user"], {"user_id": row["user_id"]})
        used_cur = await conn.execute(queries["use_token"], {"id": token_id})
        used = await used_cur.fetchone()
        if used is None:
            raise e.TokenUsed()  # a concurrent use won
        return used[0], used[1]
