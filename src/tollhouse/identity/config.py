"""What the identity services need from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from tollhouse.identity.oidc import (
    APPLE_ISSUERS,
    APPLE_JWKS_URL,
    GOOGLE_ISSUERS,
    GOOGLE_JWKS_URL,
    ProviderConfig,
)
from tollhouse.identity.passwords import PasswordProfile


@dataclass(frozen=True)
class IdentityConfig:
    password_profile: PasswordProfile = "rfc9106-low-memory"  # noqa: S105 - a profile name
    password_concurrency: int = 2
    session_ttl_seconds: int = 30 * 24 * 3600
    reauth_seconds: int = 300
    signin_limit: int = 20
    signin_window_seconds: int = 900
    verify_email_ttl_seconds: int = 24 * 3600
    reset_password_ttl_seconds: int = 3600
    #: Explicit linking only with a nonce this session was given (RELIABILITY A-08).
    link_nonce_required: bool = False
    link_nonce_ttl_seconds: int = 600
    google_client_ids: frozenset[str] = field(default_factory=frozenset)
    apple_client_ids: frozenset[str] = field(default_factory=frozenset)
    google_jwks_url: str = GOOGLE_JWKS_URL
    apple_jwks_url: str = APPLE_JWKS_URL

    def providers(self) -> dict[str, ProviderConfig]:
        return {
            "google": ProviderConfig(
                "google", GOOGLE_ISSUERS, self.google_jwks_url, self.google_client_ids, False
            ),
            "apple": ProviderConfig(
                "apple", APPLE_ISSUERS, self.apple_jwks_url, self.apple_client_ids, True
            ),
        }
