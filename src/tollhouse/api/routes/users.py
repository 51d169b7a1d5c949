"""Users, as the app backend manages them (service key)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field

from tollhouse.api.deps import ServiceKey, TollhouseDep
from tollhouse.api.schemas import (
    EmailStr,
    PreferencesOut,
    PreferencesPatch,
    ProfilePatch,
    Strict,
    TokenOut,
    UserOut,
)
from tollhouse.identity.passwords import check_password_rules

router = APIRouter(prefix="/v1/users", tags=["users"])


class UserCreate(Strict):
    email: str | None = Field(default=None, min_length=3, max_length=320)
    display_name: str | None = Field(default=None, max_length=200)
    password: str | None = Field(default=None, min_length=1, max_length=1024)
    email_verified: bool = False


class UserPatch(ProfilePatch):
    status: Literal["active", "suspended", "disabled"] | None = None
    is_internal: bool | None = None
    plan_override: Literal["free", "starter", "pro", "power"] | None = None
    metadata: dict[str, Any] | None = None


class UserList(BaseModel):
    users: list[UserOut]


class RoleBody(Strict):
    role: Literal["superuser", "admin", "user", "member"]


class EmailBody(Strict):
    email: str = EmailStr
    verified: bool = False


@router.post(
    "",
    response_model=UserOut,
    status_code=status.HTTP_201_CREATED,
    summary="Create a user (with a personal tenant)",
    responses={409: {"description": "email_taken"}},
)
async def create_user(body: UserCreate, _: ServiceKey, tollhouse: TollhouseDep) -> UserOut:
    password_hash = None
    if body.password is not None:
        check_password_rules(body.password)
        password_hash = await tollhouse.auth.hasher.hash(body.password)
    user = await tollhouse.users.create(
        email=body.email,
        display_name=body.display_name,
        password_hash=password_hash,
        email_verified=body.email_verified,
        via="email:password" if password_hash else "admin",
    )
    return UserOut.of(user)


@router.get("", response_model=UserList, summary="Find users by e-mail address")
async def find_users(
    _: ServiceKey, tollhouse: TollhouseDep, email: Annotated[str, Query(max_length=320)]
) -> UserList:
    user = await tollhouse.users.find_by_email(email)
    return UserList(users=[UserOut.of(user)] if user else [])


@router.get(
    "/{user_id}",
    response_model=UserOut,
    summary="A user with e-mails, identities, roles",
    responses={404: {"description": "user_not_found"}},
)
async def get_user(
    user_id: uuid.UUID, _: ServiceKey, tollhouse: TollhouseDep, include_deleted: bool = False
) -> UserOut:
    return UserOut.of(await tollhouse.users.get(user_id, include_deleted=include_deleted))


@router.patch("/{user_id}", response_model=UserOut, summary="Change a user's fields")
async def update_user(
    user_id: uuid.UUID, body: UserPatch, _: ServiceKey, tollhouse: TollhouseDep
) -> UserOut:
    changes = body.model_dump(exclude_unset=True)
    return UserOut.of(await tollhouse.update_user(user_id, changes))


@router.delete("/{user_id}", response_model=UserOut, summary="Soft-delete a user")
async def delete_user(user_id: uuid.UUID, _: ServiceKey, tollhouse: TollhouseDep) -> UserOut:
    return UserOut.of(await tollhouse.users.delete(user_id))


@router.post("/{user_id}/restore", response_model=UserOut, summary="Undo a soft delete")
async def restore_user(user_id: uuid.UUID, _: ServiceKey, tollhouse: TollhouseDep) -> UserOut:
    return UserOut.of(await tollhouse.users.restore(user_id))


@router.post("/{user_id}/roles", response_model=UserOut, summary="Grant a role")
async def grant_role(
    user_id: uuid.UUID, body: RoleBody, _: ServiceKey, tollhouse: TollhouseDep
) -> UserOut:
    return UserOut.of(await tollhouse.users.set_role(user_id, body.role))


@router.delete("/{user_id}/roles/{role}", response_model=UserOut, summary="Revoke a role")
async def revoke_role(
    user_id: uuid.UUID, role: str, _: ServiceKey, tollhouse: TollhouseDep
) -> UserOut:
    return UserOut.of(await tollhouse.users.set_role(user_id, role, granted=False))


@router.post(
    "/{user_id}/emails",
    response_model=UserOut,
    status_code=status.HTTP_201_CREATED,
    summary="Add an e-mail address",
)
async def add_email(
    user_id: uuid.UUID, body: EmailBody, _: ServiceKey, tollhouse: TollhouseDep
) -> UserOut:
    return UserOut.of(await tollhouse.users.add_email(user_id, body.email, verified=body.verified))


@router.post(
    "/{user_id}/emails/verification",
    response_model=TokenOut,
    summary="Issue a token that verifies one of the user's addresses",
)
async def request_verification(
    user_id: uuid.UUID, body: EmailBody, _: ServiceKey, tollhouse: TollhouseDep
) -> TokenOut:
    return TokenOut.of(await tollhouse.auth.request_email_verification(user_id, body.email))


@router.get(
    "/{user_id}/preferences", response_model=PreferencesOut, summary="The user's e-mail preferences"
)
async def get_preferences(
    user_id: uuid.UUID, _: ServiceKey, tollhouse: TollhouseDep
) -> PreferencesOut:
    return PreferencesOut.of(await tollhouse.users.preferences(user_id))


@router.patch(
    "/{user_id}/preferences",
    response_model=PreferencesOut,
    summary="Change the user's e-mail preferences",
)
async def update_preferences(
    user_id: uuid.UUID, body: PreferencesPatch, _: ServiceKey, tollhouse: TollhouseDep
) -> PreferencesOut:
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    return PreferencesOut.of(await tollhouse.users.update_preferences(user_id, changes))
