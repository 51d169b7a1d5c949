"""Verify Google and Apple ID tokens (OpenID Connect Core §3.1.3.7).

Checks, in order: a well-formed JWT with an allowed asymmetric algorithm; a key from the
provider's JWKS (fetched with PyJWT's `PyJWKClient`; the set is cached for an hour, and a key
the provider withdraws is refused once the set is fetched again) whose own algorithm is the
token's (an RS256 key never checks an ES256 token); the signature; `iss` exactly
one of the provider's issuers; every `aud` one of our client ids (and `azp` too when set);
`exp` and `iat` within 60 s of skew; `sub`; the nonce when the provider requires one or the
caller sent one. Replay of a nonce is refused by the caller (it needs the database).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import jwt
from jwt import PyJWK, PyJWKClient

from tollhouse import errors as e

Provider = Literal["google", "apple"]
ALLOWED_ALGORITHMS = ("RS256", "ES256")
ID_TOKEN_CLAIMS = ("iss", "sub", "aud", "exp", "iat")
NOTIFICATION_CLAIMS = ("iss", "aud", "exp", "iat", "jti", "events")
MAX_SKEW_SECONDS = 60


@dataclass(frozen=True)
class ProviderConfig:
    """How to trust one provider."""

    name: Provider
    issuers: frozenset[str]
    jwks_url: str
    client_ids: frozenset[str]
    nonce_required: bool


GOOGLE_ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})
APPLE_ISSUERS = frozenset({"https://appleid.apple.com"})
GOOGLE_JWKS_URL = "https://www.googleapis.com/oauth2/v3/certs"
APPLE_JWKS_URL = "https://appleid.apple.com/auth/keys"


@dataclass(frozen=True)
class VerifiedIdentity:
    """What a verified ID token says about the person."""

    provider: Provider
    subject: str
    email: str | None
    email_verified: bool
    is_private_email: bool
    name: str | None
    nonce_hash: bytes | None
    expires_at: int


def parse_bool_claim(value: object) -> bool:
    """Apple sends booleans or the strings "true"/"false"; anything else is false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value == "true"
    return False


class OidcVerifier:
    """Verifies ID tokens for the configured providers."""

    def __init__(
        self, providers: Mapping[str, ProviderConfig], key_set_lifespan: float = 3600
    ) -> None:
        self._providers = dict(providers)
        self._jwks = {
            # No `cache_keys`: PyJWT keeps the keys it returned in an LRU cache without expiry,
            # so a key withdrawn from the set would stay trusted. The set's own cache suffices.
            name: PyJWKClient(config.jwks_url, lifespan=key_set_lifespan, timeout=10)
            for name, config in self._providers.items()
        }

    def provider(self, name: str) -> ProviderConfig:
        config = self._providers.get(name)
        if config is None or not config.client_ids:
            raise e.ProviderNotConfigured(f"sign-in with {name!r} is not configured", provider=name)
        return config

    async def verify(self, name: str, id_token: str, nonce: str | None) -> VerifiedIdentity:
        config = self.provider(name)
        claims = await self._claims(config, id_token, ID_TOKEN_CLAIMS)
        return _identity(config, claims, nonce)

    async def verify_apple_notification(self, token: str) -> AppleNotification:
        """A server-to-server notification of Sign in with Apple: a JWT signed with the same
        keys as its ID tokens, for one of our client ids, whose `events` claim is a JSON
        string describing one event of one Apple user."""
        config = self.provider("apple")
        claims = await self._claims(config, token, NOTIFICATION_CLAIMS)
        return _notification(claims)

    async def _claims(
        self, config: ProviderConfig, token: str, require: tuple[str, ...]
    ) -> dict[str, Any]:
        header = _header(token)
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise e.IdTokenAlgorithm(f"algorithm {header.get('alg')!r} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise e.IdTokenUnknownKey("the ID token names no key (kid)")
        jwk = await asyncio.to_thread(self._signing_key, config.name, kid)
        if jwk.algorithm_name != header["alg"]:
            # PyJWT would raise TypeError for a key of the other type (a 500, not a 401).
            raise e.IdTokenAlgorithm(
                f"the key {kid[:40]!r} signs with {jwk.algorithm_name}, not {header['alg']}"
            )
        return _decode(token, jwk.key, header["alg"], config, require)

    def _signing_key(self, name: str, kid: str) -> PyJWK:
        try:
            return self._jwks[name].get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise e.ProviderUnavailable(f"cannot fetch {name} keys: {exc}") from exc
        except jwt.PyJWKClientError as exc:
            raise e.IdTokenUnknownKey(f"no {name} key with kid {kid[:40]!r}") from exc


def _header(id_token: str) -> dict[str, Any]:
    if not isinstance(id_token, str) or id_token.count(".") != 2 or len(id_token) > 16_384:
        raise e.IdTokenMalformed()
    try:
        return jwt.get_unverified_header(id_token)
    except jwt.InvalidTokenError as exc:  # DecodeError, and bad "kid"/"crit" headers
        raise e.IdTokenMalformed() from exc


def _decode(
    id_token: str, key: Any, algorithm: str, config: ProviderConfig, require: tuple[str, ...]
) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            id_token,
            key,
            algorithms=[algorithm],
            options={
                "require": list(require),
                "verify_aud": False,  # checked below: every audience must be ours
                "verify_iss": False,  # checked below: exact match against a set
            },
            leeway=MAX_SKEW_SECONDS,
        )
    except jwt.InvalidSignatureError as exc:
        raise e.IdTokenSignature() from exc
    except jwt.ExpiredSignatureError as exc:
        raise e.IdTokenExpired() from exc
    except jwt.ImmatureSignatureError as exc:
        raise e.IdTokenNotYetValid() from exc
    except jwt.MissingRequiredClaimError as exc:
        raise e.IdTokenClaims(f"the ID token lacks the {exc.claim!r} claim") from exc
    except (jwt.InvalidAlgorithmError, jwt.InvalidKeyError) as exc:
        raise e.IdTokenAlgorithm() from exc
    except jwt.DecodeError as exc:
        raise e.IdTokenMalformed() from exc
    except jwt.InvalidTokenError as exc:
        raise e.IdTokenClaims(f"the ID token's claims are invalid: {exc}") from exc

    if claims.get("iss") not in config.issuers:
        raise e.IdTokenIssuer()
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if not audiences or any(aud not in config.client_ids for aud in audiences):
        raise e.IdTokenAudience()
    azp = claims.get("azp")
    if azp is not None and azp not in config.client_ids:
        raise e.IdTokenAudience("the ID token's authorized party (azp) is not our client")
    if len(audiences) > 1 and azp is None:
        raise e.IdTokenAudience("a token with several audiences must name its azp")
    iat = claims["iat"]
    if not isinstance(iat, int | float) or iat > time.time() + MAX_SKEW_SECONDS:
        raise e.IdTokenNotYetValid()
    if "sub" in require and not _subject(claims.get("sub")):
        raise e.IdTokenClaims("the ID token's subject is missing or malformed")
    return claims


def _subject(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 255


#: Kinds of Apple notification, and what each does (docs/identity.md). Apple's documentation
#: spells the deletion both `account-delete` and `account-deleted`.
APPLE_EVENT_TYPES = frozenset(
    {"consent-revoked", "account-delete", "account-deleted", "email-disabled", "email-enabled"}
)


@dataclass(frozen=True)
class AppleNotification:
    """One verified event of a Sign in with Apple user."""

    jti: str
    type: str
    subject: str
    event_time: datetime | None
    email: str | None


def _notification(claims: dict[str, Any]) -> AppleNotification:
    jti, raw = claims["jti"], claims["events"]
    if not isinstance(jti, str) or not 1 <= len(jti) <= 255:
        raise e.IdTokenClaims("the notification's jti is missing or malformed")
    try:
        event = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise e.IdTokenClaims("the notification's events claim is not JSON") from exc
    if not isinstance(event, dict):
        raise e.IdTokenClaims("the notification's events claim is not an object")
    kind, subject = event.get("type"), event.get("sub")
    if not isinstance(kind, str) or not 1 <= len(kind) <= 100 or not _subject(subject):
        raise e.IdTokenClaims("the notification's event has no type or subject")
    millis = event.get("event_time")
    when = None
    if isinstance(millis, int) and not isinstance(millis, bool) and 0 < millis < 10**14:
        when = datetime.fromtimestamp(millis / 1000, UTC)
    email = event.get("email")
    return AppleNotification(
        jti=jti,
        type=kind,
        subject=str(subject),
        event_time=when,
        email=email if isinstance(email, str) else None,
    )


def _identity(
    config: ProviderConfig, claims: dict[str, Any], nonce: str | None
) -> VerifiedIdentity:
    token_nonce = claims.get("nonce")
    if config.nonce_required and (nonce is None or token_nonce is None):
        raise e.NonceMissing()
    if (nonce is None) != (token_nonce is None):
        raise e.NonceMismatch() if nonce is not None else e.NonceMissing()
    nonce_hash = None
    if nonce is not None:
        # Apple's native flows put SHA-256(nonce) in the token; its JS flow the nonce itself.
        hashed = hashlib.sha256(nonce.encode()).hexdigest()
        if not isinstance(token_nonce, str) or not (
            hmac.compare_digest(token_nonce.encode(), nonce.encode())
            or hmac.compare_digest(token_nonce.encode(), hashed.encode())
        ):
            raise e.NonceMismatch()
        # Replay is keyed on the token's own nonce, not the caller's: a token carrying
        # SHA-256(nonce) could otherwise be used twice, once with the nonce and once with
        # the hash (which the token shows to whoever holds it).
        nonce_hash = hashlib.sha256(f"{claims['sub']}:{token_nonce}".encode()).digest()
    email = claims.get("email")
    if email is not None and not isinstance(email, str):
        raise e.IdTokenClaims("the ID token's email claim is malformed")
    name = claims.get("name")
    return VerifiedIdentity(
        provider=config.name,
        subject=claims["sub"],
        email=email,
        email_verified=parse_bool_claim(claims.get("email_verified")),
        is_private_email=parse_bool_claim(claims.get("is_private_email")),
        name=name if isinstance(name, str) else None,
        nonce_hash=nonce_hash,
        expires_at=int(claims["exp"]),
    )
