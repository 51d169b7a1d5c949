"""Identity records: frozen dataclasses built from rows (pydantic stays at the edges)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class UserEmail:
    email: str
    is_primary: bool
    verified: bool
    via: str
    created_at: datetime
    verified_at: datetime | None
    #: False while mail to it does not arrive (Apple's relay with forwarding turned off).
    deliverable: bool = True


@dataclass(frozen=True)
class UserIdentity:
    provider: str
    subject: str
    email: str | None
    email_verified: bool
    is_private_email: bool
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True)
class User:
    """A user with everything `GET /v1/users/{id}` shows."""

    id: uuid.UUID
    display_name: str | None
    first_name: str | None
    last_name: str | None
    username: str | None
    avatar_url: str | None
    status: str
    is_internal: bool
    plan_override: str | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    deleted_at: datetime | None
    has_password: bool
    personal_tenant_id: uuid.UUID | None
    emails: list[UserEmail] = field(default_factory=list)
    identities: list[UserIdentity] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    #: The plan billing gives the personal tenant (subscription, else lifetime deal).
    billing_plan: str | None = None

    @property
    def primary_email(self) -> str | None:
        return next((e.email for e in self.emails if e.is_primary), None)

    @property
    def effective_plan(self) -> str:
        """`plan_override`, else the current subscription's or a lifetime deal's plan, else
        free."""
        return self.plan_override or self.billing_plan or "free"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> User:
        emails = [UserEmail(**_times(e, "created_at", "verified_at")) for e in row.pop("emails")]
        identities = [
            UserIdentity(**_times(i, "created_at", "last_used_at")) for i in row.pop("identities")
        ]
        roles = list(row.pop("roles"))
        return cls(**row, emails=emails, identities=identities, roles=roles)


@dataclass(frozen=True)
class EmailPreferences:
    marketing: bool
    product_updates: bool
    payment_receipts: bool
    updated_at: datetime


@dataclass(frozen=True)
class Session:
    id: uuid.UUID
    user_id: uuid.UUID
    method: str
    created_at: datetime
    authenticated_at: datetime
    expires_at: datetime
    last_seen_at: datetime | None


@dataclass(frozen=True)
class SignIn:
    """The outcome of a sign-in: a new session for the user."""

    session_token: str
    session: Session
    user: User
    created: bool
    linked: bool


@dataclass(frozen=True)
class IssuedUserToken:
    """A verification or reset token, handed to the app to deliver (Tollhouse sends no mail)."""

    token: str
    expires_at: datetime


def _times(item: dict[str, Any], *names: str) -> dict[str, Any]:
    """json_build_object gives timestamps as ISO strings; bring them back to datetimes."""
    out = dict(item)
    for name in names:
        if isinstance(out.get(name), str):
            out[name] = datetime.fromisoformat(out[name])
    return out
