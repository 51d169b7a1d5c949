"""Sign-up, sign-in and tokens, called by the app backend (service key)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from tollhouse.api.deps import ServiceKey, TollhouseDep
from tollhouse.api.schemas import EmailStr, PasswordStr, SignInOut, Strict, TokenOut, UserOut

router = APIRouter(prefix="/v1/auth", tags=["auth"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "invalid_credentials, id_token_*, nonce_*"},
    403: {"description": "account_disabled"},
    409: {"description": "email_taken, account_exists_link_required"},
    429: {"description": "too_many_attempts"},
}


class SignUpBody(Strict):
    email: str = EmailStr
    password: str = PasswordStr
    display_name: str | None = Field(default=None, max_length=200)


class SignUpOut(SignInOut):
    verification_token: TokenOut


class LoginBody(Strict):
    email: str = EmailStr
    password: str = PasswordStr
    client_ip: str | None = Field(
        default=None,
        max_length=64,
        description="Your end user's address: failed sign-ins are limited per address too.",
    )


class OidcBody(Strict):
    id_token: str = Field(min_length=1, max_length=16384)
    nonce: str | None = Field(default=None, min_length=1, max_length=512)
    first_name: str | None = Field(default=None, max_length=100, description="Apple, first time.")
    last_name: str | None = Field(default=None, max_length=100, description="Apple, first time.")


class LogoutBody(Strict):
    session_token: str = Field(min_length=1, max_length=200)


class ResetRequestBody(Strict):
    email: str = EmailStr


class ResetRequestOut(BaseModel):
    reset: TokenOut | None = Field(
        description="Null for an unknown address: answer your user the same way either way."
    )


class ResetBody(Strict):
    token: str = Field(min_length=1, max_length=200)
    new_password: str = PasswordStr


class VerifyBody(Strict):
    token: str = Field(min_length=1, max_length=200)


@router.post(
    "/password/signup",
    response_model=SignUpOut,
    status_code=status.HTTP_201_CREATED,
    summary="Create a password account and sign it in",
    responses=_ERRORS,
)
async def signup(body: SignUpBody, _: ServiceKey, tollhouse: TollhouseDep) -> SignUpOut:
    sign_in, token = await tollhouse.auth.sign_up(body.email, body.password, body.display_name)
    out = SignInOut.of(sign_in)
    return SignUpOut(**out.model_dump(), verification_token=TokenOut.of(token))


@router.post(
    "/password/login",
    response_model=SignInOut,
    summary="Sign in with a password",
    responses=_ERRORS,
)
async def login(body: LoginBody, _: ServiceKey, tollhouse: TollhouseDep) -> SignInOut:
    # Only the app knows its end user's address; without it only the per-account limit applies.
    return SignInOut.of(
        await tollhouse.auth.sign_in_password(body.email, body.password, body.client_ip)
    )


@router.post(
    "/oidc/{provider}",
    response_model=SignInOut,
    summary="Sign in, link or sign up with a Google or Apple ID token",
    responses=_ERRORS,
)
async def oidc(
    provider: Literal["google", "apple"], body: OidcBody, _: ServiceKey, tollhouse: TollhouseDep
) -> SignInOut:
    sign_in = await tollhouse.auth.sign_in_oidc(
        provider, body.id_token, body.nonce, first_name=body.first_name, last_name=body.last_name
    )
    return SignInOut.of(sign_in)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, summary="End a session")
async def logout(body: LogoutBody, _: ServiceKey, tollhouse: TollhouseDep) -> None:
    await tollhouse.auth.sign_out(body.session_token)


@router.post(
    "/password/reset-request",
    response_model=ResetRequestOut,
    summary="Issue a password-reset token for the app to deliver",
)
async def reset_request(
    body: ResetRequestBody, _: ServiceKey, tollhouse: TollhouseDep
) -> ResetRequestOut:
    issued = await tollhouse.auth.request_password_reset(body.email)
    return ResetRequestOut(reset=TokenOut.of(issued) if issued else None)


@router.post(
    "/password/reset",
    response_model=UserOut,
    summary="Set a new password with a reset token; every session ends",
)
async def reset(body: ResetBody, _: ServiceKey, tollhouse: TollhouseDep) -> UserOut:
    return UserOut.of(await tollhouse.auth.reset_password(body.token, body.new_password))


@router.post(
    "/email/verify",
    response_model=UserOut,
    summary="Verify an e-mail address with its token; every session ends",
)
async def verify_email(body: VerifyBody, _: ServiceKey, tollhouse: TollhouseDep) -> UserOut:
    return UserOut.of(await tollhouse.auth.verify_email(body.token))


class AppleNotificationBody(BaseModel):
    """What Apple posts; fields it may add later are ignored."""

    payload: str = Field(min_length=1, max_length=16384, description="The notification's JWT.")


class AppleNotificationOut(BaseModel):
    jti: str
    type: str
    outcome: Literal["applied", "unknown_subject", "ignored"]
    duplicate: bool = Field(description="Received before under this jti: nothing was done now.")


@router.post(
    "/apple/notifications",
    response_model=AppleNotificationOut,
    summary="Sign in with Apple's server-to-server notifications (no service key: Apple's "
    "signature is the authentication)",
    responses={
        401: {"description": "id_token_* (not a notification signed by Apple for us)"},
        400: {"description": "provider_not_configured"},
    },
)
async def apple_notification(
    body: AppleNotificationBody, tollhouse: TollhouseDep
) -> AppleNotificationOut:
    result = await tollhouse.auth.receive_apple_notification(body.payload)
    return AppleNotificationOut(
        jti=result.jti, type=result.type, outcome=result.outcome, duplicate=result.duplicate
    )
