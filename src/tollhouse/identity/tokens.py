"""Opaque bearer tokens in selector.verifier form: `<prefix>_<selector>.<secret>`.

The selector (a UUID in hex) finds the row; only SHA-256 of the secret is stored and it
is compared with `hmac.compare_digest`. A token carries 256 random bits.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from tollhouse.ids import uuid7


@dataclass(frozen=True)
class IssuedToken:
    """A token just made: `token` goes to the caller once, `secret_hash` to the database."""

    id: uuid.UUID
    token: str
    secret_hash: bytes


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def issue(prefix: str, selector: uuid.UUID | None = None) -> IssuedToken:
    """A new random token with a time-ordered selector, or the one given."""
    token_id = selector or uuid7()
    secret = secrets.token_urlsafe(32)
    return IssuedToken(token_id, f"{prefix}_{token_id.hex}.{secret}", digest(secret))


def parse(token: str, prefix: str) -> tuple[uuid.UUID, str] | None:
    """(selector, secret) of a well-formed token, else None."""
    if len(token) > 200 or not token.isascii() or not token.startswith(f"{prefix}_"):
        return None
    selector, _, secret = token[len(prefix) + 1 :].partition(".")
    if len(selector) != 32 or len(secret) != 43:
        return None
    try:
        return uuid.UUID(hex=selector), secret
    except ValueError:
        return None


def matches(secret: str, stored_hash: bytes) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return hmac.compare_digest(digest(secret), bytes(stored_hash))
