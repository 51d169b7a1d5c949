"""The end user's own account, with a session token. Reads and profile changes run as the
end-user role under row-level security, with the acting user set transaction-locally."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from tollhouse.api.deps import CurrentSession, TollhouseDep
from tollhouse.api.schemas import (
    EmailOut,
    IdentityOut,
    PasswordStr,
    PreferencesOut,
    PreferencesPatch,
    ProfilePatch,
    SessionOut,
    Strict,
    UserOut,
)

router = APIRouter(prefix="/v1/me", tags=["me"])


class EmailList(BaseModel):
    emails: list[EmailOut]


class IdentityList(BaseModel):
    identities: list[IdentityOut]


class SessionList(BaseModel):
    sessions: list[SessionOut]


class LinkBody(Strict):
    provider: Literal["google", "apple"]
    id_token: str = Field(min_length=1, max_length=16384)
    nonce: str | None = Field(default=None, min_length=1, max_length=512)


class PasswordBody(Strict):
    password: str = PasswordStr


class ChangePasswordBody(Strict):
    current_password: str = PasswordStr
    new_password: str = PasswordStr


@router.get("", response_model=UserOut, summary="My profile")
async def me(session: CurrentSession, tollhouse: TollhouseDep) -> UserOut:
    return UserOut.of(await tollhouse.me.me(session.user_id))


@router.patch("", response_model=UserOut, summary="Change my profile")
async def update_me(
    body: ProfilePatch, session: CurrentSession, tollhouse: TollhouseDep
) -> UserOut:
    changes = body.model_dump(exclude_unset=True)
    return UserOut.of(await tollhouse.me.update_profile(session.user_id, changes))


@router.get("/emails", response_model=EmailList, summary="My e-mail addresses")
async def my_emails(session: CurrentSession, tollhouse: TollhouseDep) -> EmailList:
    user = await tollhouse.me.me(session.user_id)
    return EmailList(emails=UserOut.of(user).emails)


@router.get("/identities", response_model=IdentityList, summary="My Google and Apple identities")
async def my_identities(session: CurrentSession, tollhouse: TollhouseDep) -> IdentityList:
    user = await tollhouse.me.me(session.user_id)
    return IdentityList(identities=UserOut.of(user).identities)


class LinkNonceOut(BaseModel):
    nonce: str = Field(description="Put it in the provider's request; send it back to link.")
    expires_at: datetime


@router.post(
    "/identities/nonce",
    response_model=LinkNonceOut,
    status_code=status.HTTP_201_CREATED,
    summary="A nonce for linking an identity, bound to this session (used once, 10 minutes)",
)
async def link_nonce(session: CurrentSession, tollhouse: TollhouseDep) -> LinkNonceOut:
    nonce, expires_at = await tollhouse.auth.link_nonce(session)
    return LinkNonceOut(nonce=nonce, expires_at=expires_at)


@router.post(
    "/identities",
    response_model=UserOut,
    status_code=status.HTTP_201_CREATED,
    summary="Link an identity (signed in within the last 5 minutes)",
    responses={
        403: {
            "description": "reauthentication_required, verified_email_required, "
            "link_nonce_required, link_nonce_invalid"
        },
        409: {"description": "identity_taken"},
    },
)
async def link(body: LinkBody, session: CurrentSession, tollhouse: TollhouseDep) -> UserOut:
    user = await tollhouse.auth.link_identity(session, body.provider, body.id_token, body.nonce)
    return UserOut.of(user)


@router.delete(
    "/identities/{provider}/{subject}",
    response_model=UserOut,
    summary="Unlink an identity",
    responses={409: {"description": "last_credential"}},
)
async def unlink(
    provider: str, subject: str, session: CurrentSession, tollhouse: TollhouseDep
) -> UserOut:
    return UserOut.of(await tollhouse.auth.unlink_identity(session.user_id, provider, subject))


@router.get("/preferences", response_model=PreferencesOut, summary="My e-mail preferences")
async def my_preferences(session: CurrentSession, tollhouse: TollhouseDep) -> PreferencesOut:
    return PreferencesOut.of(await tollhouse.me.preferences(session.user_id))


@router.patch("/preferences", response_model=PreferencesOut, summary="Change my e-mail preferences")
async def update_my_preferences(
    body: PreferencesPatch, session: CurrentSession, tollhouse: TollhouseDep
) -> PreferencesOut:
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    return PreferencesOut.of(await tollhouse.me.update_preferences(session.user_id, changes))


@router.get("/sessions", response_model=SessionList, summary="My live sessions")
async def my_sessions(session: CurrentSession, tollhouse: TollhouseDep) -> SessionList:
    sessions = await tollhouse.auth.sessions(session.user_id)
    return SessionList(sessions=[SessionOut.of(s) for s in sessions])


@router.post(
    "/reauthenticate",
    response_model=SessionOut,
    summary="Confirm my password to unlock sensitive actions for 5 minutes",
)
async def reauthenticate(
    body: PasswordBody, session: CurrentSession, tollhouse: TollhouseDep
) -> SessionOut:
    return SessionOut.of(await tollhouse.auth.reauthenticate(session, body.password))


@router.post(
    "/password",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Change my password; my other sessions end",
)
async def change_password(
    body: ChangePasswordBody, session: CurrentSession, tollhouse: TollhouseDep
) -> None:
    await tollhouse.auth.change_password(session, body.current_password, body.new_password)
