"""Shapes of identity bodies shared by several route modules."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tollhouse.db.values import unstorable
from tollhouse.identity import EmailPreferences, IssuedUserToken, Session, SignIn, User


class Strict(BaseModel):
    """A request body: unknown fields and what PostgreSQL cannot store (NUL, lone surrogates,
    NaN and Infinity) refused."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        reason = unstorable(data)
        if reason:
            raise ValueError(reason)
        return data


class EmailOut(BaseModel):
    email: str
    is_primary: bool
    verified: bool
    via: str
    created_at: datetime
    verified_at: datetime | None
    deliverable: bool = Field(
        default=True,
        description="False while mail to it does not arrive: Apple's relay with forwarding off.",
    )


class IdentityOut(BaseModel):
    provider: str
    subject: str
    email: str | None
    email_verified: bool
    is_private_email: bool
    created_at: datetime
    last_used_at: datetime | None


class UserOut(BaseModel):
    id: uuid.UUID
    email: str | None = Field(description="The primary e-mail address.")
    display_name: str | None
    first_name: str | None
    last_name: str | None
    username: str | None
    avatar_url: str | None
    status: str
    is_internal: bool
    plan: str = Field(description="The effective plan.")
    plan_override: str | None
    metadata: dict[str, Any]
    personal_tenant_id: uuid.UUID | None
    has_password: bool
    roles: list[str]
    emails: list[EmailOut]
    identities: list[IdentityOut]
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    deleted_at: datetime | None

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            id=user.id,
            email=user.primary_email,
            display_name=user.display_name,
            first_name=user.first_name,
            last_name=user.last_name,
            username=user.username,
            avatar_url=user.avatar_url,
            status=user.status,
            is_internal=user.is_internal,
            plan=user.effective_plan,
            plan_override=user.plan_override,
            metadata=user.metadata,
            personal_tenant_id=user.personal_tenant_id,
            has_password=user.has_password,
            roles=user.roles,
            emails=[EmailOut.model_validate(e, from_attributes=True) for e in user.emails],
            identities=[
                IdentityOut.model_validate(i, from_attributes=True) for i in user.identities
            ],
            created_at=user.created_at,
            updated_at=user.updated_at,
            last_seen_at=user.last_seen_at,
            deleted_at=user.deleted_at,
        )


class SessionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    method: str
    created_at: datetime
    authenticated_at: datetime
    expires_at: datetime
    last_seen_at: datetime | None

    @classmethod
    def of(cls, session: Session) -> SessionOut:
        return cls.model_validate(session)


class SignInOut(BaseModel):
    session_token: str = Field(description="Opaque; send as 'Authorization: Bearer <token>'.")
    session: SessionOut
    user: UserOut
    created: bool = Field(description="A new user was created by this sign-in.")
    linked: bool = Field(description="An identity was linked to an existing user.")

    @classmethod
    def of(cls, sign_in: SignIn) -> SignInOut:
        return cls(
            session_token=sign_in.session_token,
            session=SessionOut.of(sign_in.session),
            user=UserOut.of(sign_in.user),
            created=sign_in.created,
            linked=sign_in.linked,
        )


class TokenOut(BaseModel):
    token: str = Field(description="Single use; deliver it to the user (Tollhouse sends no mail).")
    expires_at: datetime

    @classmethod
    def of(cls, issued: IssuedUserToken) -> TokenOut:
        return cls(token=issued.token, expires_at=issued.expires_at)


class PreferencesOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    marketing: bool
    product_updates: bool
    payment_receipts: bool
    updated_at: datetime

    @classmethod
    def of(cls, prefs: EmailPreferences) -> PreferencesOut:
        return cls.model_validate(prefs)


class PreferencesPatch(Strict):
    marketing: bool | None = None
    product_updates: bool | None = None
    payment_receipts: bool | None = None


EmailStr = Field(min_length=3, max_length=320)
PasswordStr = Field(min_length=1, max_length=1024)
NameStr = Field(default=None, max_length=200)


class ProfilePatch(Strict):
    display_name: str | None = Field(default=None, max_length=200)
    first_name: str | None = Field(default=None, max_length=100)
    last_name: str | None = Field(default=None, max_length=100)
    username: str | None = Field(default=None, max_length=39)
    avatar_url: str | None = Field(default=None, max_length=2048)
