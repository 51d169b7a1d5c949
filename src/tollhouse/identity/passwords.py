"""Argon2id password hashing, bounded and off the event loop.

argon2-cffi releases the GIL, so hashes run in threads; a semaphore bounds how many run at
once (each costs its memory parameter, 64 MiB by default). A hash made with older
parameters verifies and is flagged for re-hashing. Unknown accounts get a verification
against a dummy hash, so they cost the same time as a wrong password.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Literal

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from tollhouse.errors import InvalidPassword

PasswordProfile = Literal["rfc9106-low-memory", "owasp-minimum", "test"]

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256

_PROFILES: dict[str, dict[str, int]] = {
    # argon2-cffi's default: RFC 9106 "low memory" (t=3, 64 MiB, p=4).
    "rfc9106-low-memory": {"time_cost": 3, "memory_cost": 65536, "parallelism": 4},
    # OWASP's second minimum configuration (t=2, 19 MiB, p=1): cheaper, still compliant.
    "owasp-minimum": {"time_cost": 2, "memory_cost": 19456, "parallelism": 1},
    # For test suites only: fast and weak.
    "test": {"time_cost": 1, "memory_cost": 64, "parallelism": 1},
}


def check_password_rules(password: str) -> None:
    """Length bounds only (NIST 800-63B): no composition rules."""
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidPassword(
            f"a password has {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
            field="password",
        )


@dataclass(frozen=True)
class Verification:
    ok: bool
    needs_rehash: bool


class PasswordHasher:
    """Hash and verify passwords with a bounded number of concurrent Argon2 computations."""

    def __init__(self, profile: PasswordProfile = "rfc9106-low-memory", concurrency: int = 2):
        params = _PROFILES[profile]
        self._hasher = Argon2Hasher(
            time_cost=params["time_cost"],
            memory_cost=params["memory_cost"],
            parallelism=params["parallelism"],
            type=Type.ID,
        )
        self._slots = asyncio.Semaphore(concurrency)
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        #: How many Argon2 verifications ran; tests and metrics read it.
        self.verifications = 0

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> Verification:
        """Check `password`; with no stored hash, spend the same time and fail."""
        candidate = stored_hash or self._dummy_hash
        async with self._slots:
            self.verifications += 1
            ok = await asyncio.to_thread(self._verify, candidate, password)
        if not ok or stored_hash is None:
            return Verification(False, False)
        return Verification(True, self._hasher.check_needs_rehash(stored_hash))

    def _verify(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
