"""Request dependencies: the wired services and the service-key check."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tollhouse.app import Tollhouse
from tollhouse.errors import InvalidSession, Unauthenticated
from tollhouse.identity import Session
from tollhouse.keys import ApiKey
from tollhouse.keys.service import KEY_PREFIX

_bearer = HTTPBearer(auto_error=False, description="A service API key: `tollhouse keys create`.")


async def get_tollhouse(request: Request) -> Tollhouse:
    """The services the app was built with (async: FastAPI runs a plain function in a
    worker thread, a thread hop on every request)."""
    tollhouse: Tollhouse = request.app.state.tollhouse
    return tollhouse


TollhouseDep = Annotated[Tollhouse, Depends(get_tollhouse)]


async def require_service_key(
    tollhouse: TollhouseDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The service API key of the request, or 401."""
    if credentials is None:
        raise Unauthenticated("missing 'Authorization: Bearer <service API key>' header")
    key = await tollhouse.keys.authenticate(credentials.credentials)
    if key is None:
        raise Unauthenticated("the service API key is unknown or revoked")
    return key


ServiceKey = Annotated[ApiKey, Depends(require_service_key)]


_session_bearer = HTTPBearer(
    auto_error=False, scheme_name="SessionToken", description="An end user's session token."
)


async def require_session(
    tollhouse: TollhouseDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_session_bearer)],
) -> Session:
    """The end user's live session, or 401."""
    if credentials is None:
        raise InvalidSession("missing 'Authorization: Bearer <session token>' header")
    return await tollhouse.auth.authenticate(credentials.credentials)


CurrentSession = Annotated[Session, Depends(require_session)]


@dataclass(frozen=True)
class Caller:
    """Who calls: a service key (`user_id` None, may do anything) or an end user's session."""

    user_id: uuid.UUID | None


_either_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ServiceKeyOrSession",
    description="A service API key, or an end user's session token.",
)


async def require_caller(
    tollhouse: TollhouseDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_either_bearer)],
) -> Caller:
    """The service (by its key) or a signed-in user, or 401."""
    if credentials is None:
        raise Unauthenticated(
            "missing 'Authorization: Bearer <service API key or session token>' header"
        )
    if credentials.credentials.startswith(KEY_PREFIX):
        await require_service_key(tollhouse, credentials)
        return Caller(None)
    session = await require_session(tollhouse, credentials)
    return Caller(session.user_id)


CallerDep = Annotated[Caller, Depends(require_caller)]
