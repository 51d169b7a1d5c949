"""Sign in with Apple's server-to-server notifications (RELIABILITY A-07).

Apple posts `{"payload": "<JWT>"}` when one of its users changes how they use our app. The
JWT is verified as an ID token is (Apple's keys, issuer, one of our client ids, expiry) and
its `events` claim names the event. Each notification is kept by its `jti` in
`apple_notifications`, in the transaction of its effects, so a repeated delivery changes
nothing:
- `consent-revoked` (the person stopped using their Apple Account with the app): the
  sessions Apple signed in before the event end. The link stays: signing in with Apple again
  is a new consent and reaches the same user.
- `account-delete` / `account-deleted` (the Apple Account is gone for good): those sessions
  end and the identity is unlinked, even when it was the user's last way in (nobody can sign
  in with it again). The user stays; the app decides what a user without a way in becomes.
- `email-disabled` / `email-enabled` (Hide My Email forwarding off / on): the address is
  marked undeliverable / deliverable (`user_emails.deliverable`), unless a later event set it.
Every applied notification writes an `identity_events` row (`apple_<type>`). An unknown
subject or an unknown event type is kept (`unknown_subject`, `ignored`) and changes nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast

from tollhouse import errors as e
from tollhouse.db.pool import Conn, Database
from tollhouse.db.queries import Queries
from tollhouse.identity.emails import provider_email
from tollhouse.identity.oidc import APPLE_EVENT_TYPES, AppleNotification, OidcVerifier
from tollhouse.identity.users import record_event

queries = Queries("tollhouse.identity", "auth.sql")

#: `applied`, `unknown_subject` (no user has this Apple id) or `ignored` (unknown type).
Outcome = Literal["applied", "unknown_subject", "ignored"]


@dataclass(frozen=True)
class AppleNotificationResult:
    jti: str
    type: str
    outcome: Outcome
    #: True when this token id was received before: nothing was done this time.
    duplicate: bool


async def receive_apple_notification(
    db: Database, verifier: OidcVerifier, token: str
) -> AppleNotificationResult:
    """Verify one notification and apply it once; `IdTokenRejected` when it is not Apple's."""
    event = await verifier.verify_apple_notification(token)

    async def work(conn: Conn) -> AppleNotificationResult:
        cur = await conn.execute(
            queries["identity_owner"], {"provider": "apple", "subject": event.subject}
        )
        owner = await cur.fetchone()
        user_id: uuid.UUID | None = owner[0] if owner else None
        outcome: Outcome
        if event.type not in APPLE_EVENT_TYPES:
            outcome = "ignored"
        else:
            outcome = "applied" if user_id is not None else "unknown_subject"
        cur = await conn.execute(
            queries["remember_apple_notification"],
            {
                "jti": event.jti,
                "type": event.type,
                "subject": event.subject,
                "event_time": event.event_time,
                "user_id": user_id,
                "outcome": outcome,
            },
        )
        if await cur.fetchone() is None:
            cur = await conn.execute(queries["apple_notification"], {"jti": event.jti})
            first = await cur.fetchone()
            if first is None:  # cannot happen: the conflict was on this very row
                raise e.TollhouseError("the notification vanished")
            return AppleNotificationResult(
                event.jti, first[0], cast(Outcome, first[1]), duplicate=True
            )
        if outcome == "applied" and user_id is not None:
            await conn.execute(queries["lock_user"], {"user_id": user_id})
            await _apply(conn, user_id, event)
        return AppleNotificationResult(event.jti, event.type, outcome, duplicate=False)

    return await db.transaction(work)


async def _apply(conn: Conn, user_id: uuid.UUID, event: AppleNotification) -> None:
    at = event.event_time or datetime.now(UTC)
    if event.type in ("consent-revoked", "account-delete", "account-deleted"):
        await conn.execute(queries["revoke_apple_sessions"], {"user_id": user_id, "before": at})
    if event.type in ("account-delete", "account-deleted"):
        await conn.execute(
            queries["unlink_identity"],
            {"user_id": user_id, "provider": "apple", "subject": event.subject},
        )
    if event.type in ("email-disabled", "email-enabled"):
        await conn.execute(
            queries["set_deliverable"],
            {
                "user_id": user_id,
                "subject": event.subject,
                "email": provider_email(event.email),
                "deliverable": event.type == "email-enabled",
                "at": at,
            },
        )
    await record_event(
        conn, user_id, "apple_" + event.type.replace("-", "_"), provider="apple", jti=event.jti
    )
