"""Multi-step flows several tests need."""

from __future__ import annotations

from tollhouse.app import Tollhouse
from tollhouse.identity import Session, SignIn

PASSWORD = "correct horse battery"


async def verified_account(tollhouse: Tollhouse, email: str) -> tuple[SignIn, Session]:
    """Sign up, verify the address (which ends the sign-up session), sign in again."""
    _, verification = await tollhouse.auth.sign_up(email, PASSWORD)
    await tollhouse.auth.verify_email(verification.token)
    sign_in = await tollhouse.auth.sign_in_password(email, PASSWORD, None)
    return sign_in, await tollhouse.auth.authenticate(sign_in.session_token)
