"""Service API keys over HTTP (`/v1/keys`), for automation; the CLI does the same."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from tollhouse.api.deps import ServiceKey, TollhouseDep
from tollhouse.keys import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])

KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._:@/-]{0,99}$"


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    prefix: str
    bootstrap: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=KEY_NAME_PATTERN)


class KeyCreated(BaseModel):
    key: KeyOut
    secret: str = Field(description="The key itself. Shown once; only its hash is stored.")


class KeyList(BaseModel):
    keys: list[KeyOut]


def _out(key: ApiKey) -> KeyOut:
    return KeyOut.model_validate(key)


@router.get("", response_model=KeyList, summary="List service API keys")
async def list_keys(
    _: ServiceKey, tollhouse: TollhouseDep, include_revoked: bool = False
) -> KeyList:
    keys = await tollhouse.keys.list(include_revoked=include_revoked)
    return KeyList(keys=[_out(k) for k in keys])


@router.post(
    "",
    response_model=KeyCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create a service API key",
    responses={409: {"description": "api_key_name_taken"}},
)
async def create_key(body: KeyCreate, _: ServiceKey, tollhouse: TollhouseDep) -> KeyCreated:
    created = await tollhouse.keys.create(body.name)
    return KeyCreated(key=_out(created.key), secret=created.secret)


@router.delete(
    "/{key_id}",
    response_model=KeyOut,
    summary="Revoke a service API key",
    responses={404: {"description": "api_key_not_found"}},
)
async def revoke_key(key_id: uuid.UUID, _: ServiceKey, tollhouse: TollhouseDep) -> KeyOut:
    return _out(await tollhouse.keys.revoke(str(key_id)))
