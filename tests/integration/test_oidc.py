"""Google and Apple sign-in: ID-token verification (A-05), claims (A-06) and the merge
rules (A-01..A-04, A-10), against key sets the tests generate and serve on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.flows import verified_account
from tests.support.idp import GOOGLE_CLIENT, KeySet, claims, serve_rotating_jwks, sign
from tests.support.locks import a_lock_wait
from tollhouse import errors
from tollhouse.app import Tollhouse
from tollhouse.db.queries import Queries
from tollhouse.identity import IdentityConfig, NoHooks
from tollhouse.identity.auth import AuthService
from tollhouse.identity.oidc import OidcVerifier, VerifiedIdentity, parse_bool_claim
from tollhouse.identity.passwords import Verification

PASSWORD = "correct horse battery"


def _count_sessions(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM tollhouse.sessions").fetchone()
    assert row is not None
    return int(row[0])


def _other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _hs256_with_public_key(keys: KeySet) -> str:
    pem = keys.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","kid":"rsa-1","typ":"JWT"}')
    payload = jwt.utils.base64url_encode(
        jwt.api_jws.json.dumps(claims("google")).encode()  # type: ignore[attr-defined]
    )
    import hmac

    signature = hmac.new(pem, header + b"." + payload, hashlib.sha256).digest()
    return b".".join([header, payload, jwt.utils.base64url_encode(signature)]).decode()


def _alg_none() -> str:
    return jwt.encode(claims("google"), key=None, algorithm="none")  # type: ignore[arg-type]


BadToken = Callable[[KeySet], tuple[str, str, str | None, str]]

# (provider, token, nonce sent, expected error code): the 14 cases of RELIABILITY A-05.
BAD_TOKENS: dict[str, BadToken] = {
    "bad signature": lambda k: (
        "google",
        sign(k, claims("google"), key=_other_key()),
        None,
        "id_token_bad_signature",
    ),
    "alg none": lambda k: ("google", _alg_none(), None, "id_token_algorithm_not_allowed"),
    "HS256 keyed with the RSA public key": lambda k: (
        "google",
        _hs256_with_public_key(k),
        None,
        "id_token_algorithm_not_allowed",
    ),
    "unknown kid": lambda k: (
        "google",
        sign(k, claims("google"), kid="rotated-away"),
        None,
        "id_token_unknown_key",
    ),
    "look-alike issuer": lambda k: (
        "google",
        sign(k, claims("google", iss="https://accounts.google.com.evil")),
        None,
        "id_token_wrong_issuer",
    ),
    "audience not ours": lambda k: (
        "google",
        sign(k, claims("google", aud="someone-else")),
        None,
        "id_token_wrong_audience",
    ),
    "extra untrusted audience": lambda k: (
        "google",
        sign(k, claims("google", aud=[GOOGLE_CLIENT, "other"], azp=GOOGLE_CLIENT)),
        None,
        "id_token_wrong_audience",
    ),
    "azp mismatch": lambda k: (
        "google",
        sign(k, claims("google", azp="other-client")),
        None,
        "id_token_wrong_audience",
    ),
    "expired beyond the skew": lambda k: (
        "google",
        sign(k, claims("google", exp=int(time.time()) - 61)),
        None,
        "id_token_expired",
    ),
    "issued in the future": lambda k: (
        "google",
        sign(k, claims("google", iat=int(time.time()) + 600)),
        None,
        "id_token_issued_in_future",
    ),
    "nonce missing": lambda k: (
        "apple",
        sign(k, claims("apple", nonce=None)),
        None,
        "nonce_missing",
    ),
    "nonce mismatched": lambda k: (
        "apple",
        sign(k, claims("apple", nonce="token-nonce")),
        "other-nonce",
        "nonce_mismatch",
    ),
    "other environment's client id": lambda k: (
        "apple",
        sign(k, claims("apple", aud="com.example.tollhouse.staging", nonce="n1")),
        "n1",
        "id_token_wrong_audience",
    ),
    "malformed": lambda k: ("google", "not.a.jwt", None, "id_token_malformed"),
    # Not in A-05's list: a key of the other type than the token's algorithm (PyJWT raised
    # TypeError on it, a 500).
    "ES256 token naming the RSA key": lambda k: (
        "google",
        sign(k, claims("google"), alg="ES256", kid=k.rsa_kid),
        None,
        "id_token_algorithm_not_allowed",
    ),
    "RS256 token naming the EC key": lambda k: (
        "google",
        sign(k, claims("google"), alg="RS256", kid=k.ec_kid),
        None,
        "id_token_algorithm_not_allowed",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_id_tokens_are_refused_and_create_nothing(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet, case: str
) -> None:
    provider, token, nonce, code = BAD_TOKENS[case](idp_keys)
    with pytest.raises(errors.IdTokenRejected) as caught:
        await tollhouse.auth.sign_in_oidc(provider, token, nonce)
    assert caught.value.code == code
    assert _count_sessions(dsn) == 0
    assert await tollhouse.users.find_by_identity(provider, "x") is None


async def test_a_replayed_nonce_is_refused(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    token = sign(idp_keys, claims("apple", nonce="once-only", email="r@icloud.com"))
    await tollhouse.auth.sign_in_oidc("apple", token, "once-only")
    with pytest.raises(errors.NonceReplayed):
        await tollhouse.auth.sign_in_oidc("apple", token, "once-only")
    assert _count_sessions(dsn) == 1


async def test_apple_hashed_nonce_and_es256_keys_are_accepted(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    raw = "raw-nonce-123"
    hashed = hashlib.sha256(raw.encode()).hexdigest()
    token = sign(idp_keys, claims("apple", nonce=hashed), alg="ES256")
    sign_in = await tollhouse.auth.sign_in_oidc("apple", token, raw)
    assert sign_in.created


async def test_a_hashed_nonce_token_cannot_be_replayed_with_the_hash(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """Whoever holds a token from Apple's native flow sees SHA-256(nonce) in it; sending
    that as the nonce matches too, and must still count as the same use of the token."""
    raw = "raw-nonce-456"
    hashed = hashlib.sha256(raw.encode()).hexdigest()
    token = sign(idp_keys, claims("apple", nonce=hashed, email="h@icloud.com"), alg="ES256")
    await tollhouse.auth.sign_in_oidc("apple", token, raw)
    for sent in (hashed, raw):
        with pytest.raises(errors.NonceReplayed):
            await tollhouse.auth.sign_in_oidc("apple", token, sent)
    assert _count_sessions(dsn) == 1


async def test_a_key_withdrawn_from_the_set_is_refused_once_the_set_is_fetched_again(
    idp_keys: KeySet,
) -> None:
    with serve_rotating_jwks(idp_keys) as (url, publish):
        config = IdentityConfig(google_client_ids=frozenset({GOOGLE_CLIENT}), google_jwks_url=url)
        verifier = OidcVerifier(config.providers(), key_set_lifespan=0.2)
        await verifier.verify("google", sign(idp_keys, claims("google", "before")), None)
        publish(KeySet(rsa_kid="rsa-2", ec_kid="ec-2"))  # rsa-1 withdrawn
        await asyncio.sleep(0.3)  # the cached set expires
        with pytest.raises(errors.IdTokenUnknownKey):
            await verifier.verify("google", sign(idp_keys, claims("google", "after")), None)


@pytest.mark.parametrize("issuer", ["https://accounts.google.com", "accounts.google.com"])
async def test_both_google_issuer_spellings_are_accepted(
    tollhouse: Tollhouse, idp_keys: KeySet, issuer: str
) -> None:
    sign_in = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", iss=issuer))
    )
    assert sign_in.created and sign_in.user.identities[0].provider == "google"


async def test_a_provider_without_client_ids_is_not_configured(
    dsn: str, idp_keys: KeySet, jwks_url: str
) -> None:
    from tollhouse.identity import IdentityConfig

    async with Tollhouse.open(
        dsn, min_size=1, max_size=1, identity=IdentityConfig(password_profile="test")
    ) as bare:
        with pytest.raises(errors.ProviderNotConfigured):
            await bare.auth.sign_in_oidc("google", sign(idp_keys, claims("google")))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        (True, True),
        ("false", False),
        (False, False),
        (None, False),
        ("True", False),
        ("yes", False),
        (1, False),
    ],
)
def test_boolean_claims_are_parsed_strictly(value: Any, expected: bool) -> None:
    assert parse_bool_claim(value) is expected


# --- merge rules -------------------------------------------------------------------------------


async def test_new_google_user_with_a_verified_address(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    token = sign(idp_keys, claims("google", email="New@Gmail.com", email_verified=True))
    sign_in = await tollhouse.auth.sign_in_oidc("google", token)
    assert (sign_in.created, sign_in.linked) == (True, False)
    assert [(e.email, e.verified, e.via) for e in sign_in.user.emails] == [
        ("new@gmail.com", True, "google")
    ]
    assert sign_in.user.personal_tenant_id is not None
    await tollhouse.auth.authenticate(sign_in.session_token)


async def test_known_subject_signs_in_even_with_a_new_or_missing_email(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """A-02 (same sub) and A-06 (Apple sends the e-mail only the first time)."""
    first = await tollhouse.auth.sign_in_oidc(
        "apple",
        sign(
            idp_keys,
            claims(
                "apple", "apple-sub-1", email="me@icloud.com", email_verified="true", nonce="n1"
            ),
        ),
        "n1",
        first_name="Jo",
        last_name="Apple",
    )
    assert first.created and first.user.display_name == "Jo Apple"
    again = await tollhouse.auth.sign_in_oidc(
        "apple",
        sign(idp_keys, claims("apple", "apple-sub-1", nonce="n2")),
        "n2",
        first_name="Someone",
        last_name="Else",
    )
    assert again.user.id == first.user.id and not again.created
    assert again.user.display_name == "Jo Apple"  # kept from the first authorisation
    assert again.user.identities[0].email == "me@icloud.com"  # not erased by the missing claim
    changed = await tollhouse.auth.sign_in_oidc(
        "apple",
        sign(
            idp_keys,
            claims("apple", "apple-sub-1", email="new@icloud.com", email_verified=True, nonce="n3"),
        ),
        "n3",
    )
    assert changed.user.id == first.user.id


async def test_unverified_provider_email_never_links(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """A-01: the existing account is not entered; the answer says to use the old method."""
    owner, verification = await tollhouse.auth.sign_up("victim@example.com", PASSWORD)
    await tollhouse.auth.verify_email(verification.token)
    token = sign(idp_keys, claims("google", email="victim@example.com", email_verified=False))
    with pytest.raises(errors.AccountExistsLinkRequired):
        await tollhouse.auth.sign_in_oidc("google", token)
    user = await tollhouse.users.get(owner.user.id)
    assert user.identities == []
    assert _count_sessions(dsn) == 1  # only the owner's, from sign-up (revoked at verify)


async def test_unverified_provider_email_is_not_stored_as_an_address(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    token = sign(idp_keys, claims("google", email="squat@example.com", email_verified=False))
    sign_in = await tollhouse.auth.sign_in_oidc("google", token)
    assert sign_in.created and sign_in.user.emails == []
    assert sign_in.user.identities[0].email == "squat@example.com"
    await tollhouse.users.create(email="squat@example.com")  # the address stays free


async def test_verified_address_links_to_the_verified_owner(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    owner, verification = await tollhouse.auth.sign_up("owner@example.com", PASSWORD)
    await tollhouse.auth.verify_email(verification.token)
    token = sign(idp_keys, claims("google", email="OWNER@example.com", email_verified=True))
    sign_in = await tollhouse.auth.sign_in_oidc("google", token)
    assert (sign_in.user.id, sign_in.created, sign_in.linked) == (owner.user.id, False, True)
    assert sign_in.user.has_password  # a verified owner keeps its password


async def test_a_second_account_at_the_same_provider_needs_explicit_linking(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """A-02: a different sub with the same address is not merged automatically."""
    token = sign(idp_keys, claims("google", "sub-a", email="two@gmail.com", email_verified=True))
    await tollhouse.auth.sign_in_oidc("google", token)
    other = sign(idp_keys, claims("google", "sub-b", email="two@gmail.com", email_verified=True))
    with pytest.raises(errors.AccountExistsLinkRequired):
        await tollhouse.auth.sign_in_oidc("google", other)


async def test_pre_hijacked_password_account_is_claimed_by_the_verified_identity(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """A-03: the attacker registered the victim's address with a password; the victim then
    signs in with Google. The attacker's password and sessions are gone."""
    attacker, _ = await tollhouse.auth.sign_up("target@example.com", "attacker password")
    victim = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", email="target@example.com", email_verified=True))
    )
    assert victim.user.id == attacker.user.id and victim.linked
    assert not victim.user.has_password
    assert victim.user.emails[0].verified
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate(attacker.session_token)
    with pytest.raises(errors.InvalidCredentials):
        await tollhouse.auth.sign_in_password("target@example.com", "attacker password", "10.9.0.1")
    await tollhouse.auth.authenticate(victim.session_token)
    with psycopg.connect(dsn) as conn:
        events = conn.execute(
            "SELECT kind FROM tollhouse.identity_events WHERE user_id = %s ORDER BY id",
            (victim.user.id,),
        ).fetchall()
    assert ("account_claimed",) in events


async def test_an_unverified_holder_with_another_identity_loses_the_address(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """Taking over an account that also opens through someone's Apple identity would share
    it: the address moves to a new user instead."""
    squatter = await tollhouse.auth.sign_in_oidc(
        "apple", sign(idp_keys, claims("apple", nonce="s1")), "s1"
    )
    await tollhouse.users.add_email(squatter.user.id, "wanted@example.com")
    victim = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", email="wanted@example.com", email_verified=True))
    )
    assert victim.created and victim.user.id != squatter.user.id
    assert victim.user.primary_email == "wanted@example.com"
    assert (await tollhouse.users.get(squatter.user.id)).emails == []


async def test_relay_address_never_merges_with_a_real_one(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    owner, verification = await tollhouse.auth.sign_up("real@example.com", PASSWORD)
    await tollhouse.auth.verify_email(verification.token)
    relay = sign(
        idp_keys,
        claims(
            "apple",
            email="abc123@privaterelay.appleid.com",
            email_verified="true",
            is_private_email="true",
            nonce="r1",
        ),
    )
    sign_in = await tollhouse.auth.sign_in_oidc("apple", relay, "r1")
    assert sign_in.created and sign_in.user.id != owner.user.id
    assert sign_in.user.identities[0].is_private_email is True


async def test_simultaneous_first_sign_ins_make_one_user(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """A-10: ten first logins of one (provider, subject) at once: exactly one user."""
    tokens = [
        sign(idp_keys, claims("google", "same-sub", email="race@gmail.com", email_verified=True))
        for _ in range(10)
    ]
    results = await asyncio.gather(*(tollhouse.auth.sign_in_oidc("google", t) for t in tokens))
    assert len({r.user.id for r in results}) == 1  # and no loser got an error
    assert sum(r.created for r in results) == 1


# --- explicit linking ---------------------------------------------------------------------------


async def test_explicit_link_needs_a_recent_sign_in(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    sign_in, session = await verified_account(tollhouse, "linker@example.com")
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE tollhouse.sessions SET authenticated_at = now() - interval '6 minutes'"
        )
    stale = await tollhouse.auth.authenticate(sign_in.session_token)
    token = sign(idp_keys, claims("google", "link-sub"))
    with pytest.raises(errors.ReauthenticationRequired):
        await tollhouse.auth.link_identity(stale, "google", token)
    fresh = await tollhouse.auth.reauthenticate(stale, PASSWORD)
    user = await tollhouse.auth.link_identity(fresh, "google", token)
    assert [(i.provider, i.subject) for i in user.identities] == [("google", "link-sub")]
    assert session.user_id == user.id


async def test_linking_someone_elses_identity_is_409(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    await tollhouse.auth.sign_in_oidc("google", sign(idp_keys, claims("google", "taken-sub")))
    _, session = await verified_account(tollhouse, "other@example.com")
    with pytest.raises(errors.IdentityTaken):
        await tollhouse.auth.link_identity(
            session, "google", sign(idp_keys, claims("google", "taken-sub"))
        )


async def test_the_last_way_to_sign_in_cannot_be_unlinked(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    sign_in = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", "only-sub"))
    )
    with pytest.raises(errors.LastCredential):
        await tollhouse.auth.unlink_identity(sign_in.user.id, "google", "only-sub")
    assert len((await tollhouse.users.get(sign_in.user.id)).identities) == 1
    session = await tollhouse.auth.authenticate(sign_in.session_token)
    await tollhouse.auth.link_identity(
        session, "apple", sign(idp_keys, claims("apple", "second-sub", nonce="l1")), "l1"
    )
    user = await tollhouse.auth.unlink_identity(sign_in.user.id, "google", "only-sub")
    assert [i.provider for i in user.identities] == ["apple"]
    with pytest.raises(errors.IdentityNotFound):
        await tollhouse.auth.unlink_identity(sign_in.user.id, "google", "only-sub")


async def test_unlinked_identity_can_sign_up_again(tollhouse: Tollhouse, idp_keys: KeySet) -> None:
    sign_in, session = await verified_account(tollhouse, "u@example.com")
    await tollhouse.auth.link_identity(session, "google", sign(idp_keys, claims("google", "g9")))
    await tollhouse.auth.unlink_identity(sign_in.user.id, "google", "g9")
    again = await tollhouse.auth.sign_in_oidc("google", sign(idp_keys, claims("google", "g9")))
    assert again.created and again.user.id != sign_in.user.id


async def test_hooks_hear_of_creations_links_and_claims(
    service_dsn: str, identity_config: IdentityConfig, idp_keys: KeySet
) -> None:
    heard: list[tuple[str, str]] = []

    class Recorder(NoHooks):
        async def on_user_created(self, user_id: uuid.UUID, method: str) -> None:
            heard.append(("created", method))

        async def on_identity_linked(self, user_id: uuid.UUID, provider: str) -> None:
            heard.append(("linked", provider))

        async def on_account_claimed(self, user_id: uuid.UUID, provider: str) -> None:
            heard.append(("claimed", provider))

        async def on_email_verified(self, user_id: uuid.UUID, email: str) -> None:
            heard.append(("verified", email))

    async with Tollhouse.open(
        service_dsn, min_size=1, max_size=2, identity=identity_config, hooks=Recorder()
    ) as tollhouse:
        await tollhouse.auth.sign_up("h@example.com", PASSWORD)
        await tollhouse.auth.sign_in_oidc(
            "google", sign(idp_keys, claims("google", email="h@example.com", email_verified=True))
        )
        _, token = await tollhouse.auth.sign_up("v@example.com", PASSWORD)
        await tollhouse.auth.verify_email(token.token)
    assert heard == [
        ("created", "email:password"),
        ("linked", "google"),
        ("claimed", "google"),
        ("created", "email:password"),
        ("verified", "v@example.com"),
    ]


async def test_housekeeping_forgets_only_what_has_expired(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    await tollhouse.auth.sign_in_oidc(
        "apple", sign(idp_keys, claims("apple", nonce="fresh")), "fresh"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tollhouse.oidc_nonces VALUES ('apple', 'old', now() - interval '1 s')"
        )
        conn.execute(
            "INSERT INTO tollhouse.signin_attempts VALUES ('ip:x', now() - interval '1 day', 3)"
        )
    await tollhouse.auth.housekeeping()
    with psycopg.connect(dsn) as conn:
        left = conn.execute(
            "SELECT (SELECT count(*) FROM tollhouse.oidc_nonces),"
            " (SELECT count(*) FROM tollhouse.signin_attempts)"
        ).fetchone()
    assert left == (1, 0)


# --- takeover paths found in review -------------------------------------------------------------


async def test_a_holder_with_a_verified_address_of_its_own_is_not_taken_over(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """The attacker verified its own address and added the victim's unverified; the victim's
    Google sign-in must not land in the attacker's account (which the attacker can reset)."""
    attacker, _ = await verified_account(tollhouse, "attacker@evil.example")
    await tollhouse.users.add_email(attacker.user.id, "victim@example.com")
    victim = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", email="victim@example.com", email_verified=True))
    )
    assert victim.created and victim.user.id != attacker.user.id
    assert victim.user.primary_email == "victim@example.com"
    kept = await tollhouse.users.get(attacker.user.id)
    assert [e.email for e in kept.emails] == ["attacker@evil.example"]
    assert kept.identities == []


async def test_an_unverified_sign_up_cannot_plant_an_identity(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """Linking needs something proven first, so an attacker who signed up with the victim's
    address cannot leave its own Google identity in the account the victim later claims."""
    attacker, _ = await tollhouse.auth.sign_up("prey@example.com", "attacker password")
    session = await tollhouse.auth.authenticate(attacker.session_token)
    with pytest.raises(errors.VerifiedEmailRequired):
        await tollhouse.auth.link_identity(
            session, "google", sign(idp_keys, claims("google", "attacker-sub"))
        )
    assert await tollhouse.users.find_by_identity("google", "attacker-sub") is None


async def test_a_disabled_unverified_holder_loses_the_address_to_its_owner(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    squatter, _ = await tollhouse.auth.sign_up("mine@example.com", PASSWORD)
    await tollhouse.users.delete(squatter.user.id)
    owner = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", email="mine@example.com", email_verified=True))
    )
    assert owner.created and owner.user.primary_email == "mine@example.com"


async def test_a_password_sign_in_in_flight_loses_to_a_claim(
    tollhouse: Tollhouse, idp_keys: KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Argon2 runs outside the transaction; the claim that commits meanwhile must win."""
    await tollhouse.auth.sign_up("slow@example.com", "attacker password")
    hasher = tollhouse.auth.hasher
    entered, release = asyncio.Event(), asyncio.Event()
    real_verify = hasher.verify

    async def paused_verify(stored: str | None, password: str) -> Verification:
        result = await real_verify(stored, password)
        entered.set()
        await release.wait()
        return result

    monkeypatch.setattr(hasher, "verify", paused_verify)
    attempt = asyncio.create_task(
        tollhouse.auth.sign_in_password("slow@example.com", "attacker password", None)
    )
    await entered.wait()
    await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", email="slow@example.com", email_verified=True))
    )
    release.set()
    with pytest.raises(errors.InvalidCredentials):
        await attempt


async def test_two_new_identities_racing_onto_one_verified_holder_link_once(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule 2 links one identity of a provider. The second sign-in waited for the holder's
    lock while the first linked: it must see that link, not its snapshot from before."""
    await verified_account(tollhouse, "holder@example.com")
    linking, release = asyncio.Event(), asyncio.Event()
    real_link = AuthService._link

    async def held_link(
        self: AuthService, conn: Any, user_id: uuid.UUID, identity: VerifiedIdentity
    ) -> None:
        if identity.subject == "g-first":
            linking.set()
            await release.wait()
        await real_link(self, conn, user_id, identity)

    monkeypatch.setattr(AuthService, "_link", held_link)

    def token(subject: str) -> str:
        return sign(
            idp_keys, claims("google", subject, email="holder@example.com", email_verified=True)
        )

    first = asyncio.create_task(tollhouse.auth.sign_in_oidc("google", token("g-first")))
    await linking.wait()
    second = asyncio.create_task(tollhouse.auth.sign_in_oidc("google", token("g-second")))
    assert await a_lock_wait(dsn, second)
    release.set()
    assert (await first).linked
    with pytest.raises(errors.AccountExistsLinkRequired):
        await second
    holder = await tollhouse.users.find_by_email("holder@example.com")
    assert holder is not None
    assert [(i.provider, i.subject) for i in holder.identities] == [("google", "g-first")]


async def test_a_verification_waits_for_a_sign_in_taking_its_address(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sign-in read the address as unverified and moves it to the provider's user; a
    verification of it that came meanwhile must not leave it with both users."""
    squatter, verification = await tollhouse.auth.sign_up("moved@example.com", "some password")
    await tollhouse.users.add_email(squatter.user.id, "kept@example.org")  # not claimable
    deciding, release = asyncio.Event(), asyncio.Event()
    real_known = AuthService._known_identity
    calls = 0

    async def paused_known(self: AuthService, conn: Any, identity: VerifiedIdentity) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the look again, after the holder's lock is taken
            deciding.set()
            await release.wait()
        return await real_known(self, conn, identity)

    monkeypatch.setattr(AuthService, "_known_identity", paused_known)
    sign_in = asyncio.create_task(
        tollhouse.auth.sign_in_oidc(
            "google",
            sign(idp_keys, claims("google", email="moved@example.com", email_verified=True)),
        )
    )
    await deciding.wait()
    verify = asyncio.create_task(tollhouse.auth.verify_email(verification.token))
    assert await a_lock_wait(dsn, verify)
    release.set()
    owner = (await sign_in).user
    await verify
    with psycopg.connect(dsn) as conn:
        held = conn.execute(
            "SELECT user_id, verified FROM tollhouse.user_emails WHERE email = %s",
            ("moved@example.com",),
        ).fetchall()
        routed = conn.execute(
            "SELECT user_id FROM tollhouse.email_routes WHERE email = %s", ("moved@example.com",)
        ).fetchall()
    assert held == [(owner.id, True)] and routed == [(owner.id,)]


async def test_a_password_change_and_a_reset_request_do_not_deadlock(
    dsn: str, tollhouse: Tollhouse
) -> None:
    """The change holds the user's lock and then retires its reset tokens; the request
    retires the old token and then makes one, whose foreign-key check needs KEY SHARE on
    the user. A FOR UPDATE lock blocked that check: each side waited for the other."""
    signed, _ = await tollhouse.auth.sign_up("both-ways@example.com", PASSWORD)
    user_id = signed.user.id
    assert await tollhouse.auth.request_password_reset("both-ways@example.com") is not None
    auth_sql = Queries("tollhouse.identity", "auth.sql")
    async with (
        await psycopg.AsyncConnection.connect(dsn) as change,
        await psycopg.AsyncConnection.connect(dsn) as request,
    ):
        cur = await change.execute(
            "SELECT password_changed_at FROM tollhouse.users WHERE id = %s", (user_id,)
        )
        changed_at = (await cur.fetchone() or (None,))[0]
        cur = await change.execute(
            auth_sql["confirm_password_unchanged"], {"user_id": user_id, "changed_at": changed_at}
        )
        assert await cur.fetchone() == (True,)
        token = {
            "id": uuid.uuid4(),
            "user_id": user_id,
            "purpose": "reset_password",
            "email": "both-ways@example.com",
            "secret_hash": b"x" * 32,
            "ttl": 600,
        }
        making = asyncio.create_task(request.execute(auth_sql["create_token"], token))

        async def request_made() -> None:
            await making
            await request.commit()

        made = asyncio.create_task(request_made())
        await a_lock_wait(dsn, making)  # it waits for the change (or never has to)
        await change.execute(
            auth_sql["set_password"],
            {"user_id": user_id, "password_hash": "h", "keep_session": None},
        )
        await change.commit()
        await made


def _pause_first_hash(
    tollhouse: Tollhouse, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """The next Argon2 hash waits, once: `entered` is set when it starts, and it goes on
    when `release` is set (the other events of a race happen in between)."""
    hasher = tollhouse.auth.hasher
    entered, release = asyncio.Event(), asyncio.Event()
    real_hash = hasher.hash

    async def paused_hash(password: str) -> str:
        if not entered.is_set():
            entered.set()
            await release.wait()
        return await real_hash(password)

    monkeypatch.setattr(hasher, "hash", paused_hash)
    return entered, release


async def test_a_password_change_in_flight_loses_to_a_claim(
    tollhouse: Tollhouse, idp_keys: KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-hijacker keeps changing the password while the address's owner claims the
    account: the change whose Argon2 ran across the claim must not put a password back."""
    attacker, _ = await tollhouse.auth.sign_up("claimed@example.com", "attacker password")
    session = await tollhouse.auth.authenticate(attacker.session_token)
    entered, release = _pause_first_hash(tollhouse, monkeypatch)
    change = asyncio.create_task(
        tollhouse.auth.change_password(session, "attacker password", "attacker password 2")
    )
    await entered.wait()
    owner = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", email="claimed@example.com", email_verified=True))
    )
    assert owner.user.id == attacker.user.id and not owner.user.has_password
    release.set()
    with pytest.raises((errors.InvalidCredentials, errors.InvalidSession)):
        await change
    assert not (await tollhouse.users.get(attacker.user.id)).has_password
    with pytest.raises(errors.InvalidCredentials):
        await tollhouse.auth.sign_in_password("claimed@example.com", "attacker password 2", None)
    await tollhouse.auth.authenticate(owner.session_token)  # the owner's session stays


async def test_a_password_change_in_flight_loses_to_its_sessions_sign_out(
    tollhouse: Tollhouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = await verified_account(tollhouse, "out@example.com")
    session = await tollhouse.auth.authenticate(first.session_token)
    entered, release = _pause_first_hash(tollhouse, monkeypatch)
    change = asyncio.create_task(tollhouse.auth.change_password(session, PASSWORD, "new pass 1"))
    await entered.wait()
    await tollhouse.auth.sign_out(first.session_token)
    release.set()
    with pytest.raises(errors.InvalidSession):
        await change
    await tollhouse.auth.sign_in_password("out@example.com", PASSWORD, None)  # unchanged


async def test_linking_ends_the_other_sessions(tollhouse: Tollhouse, idp_keys: KeySet) -> None:
    """RELIABILITY 4.2.4: any link revokes the sessions opened before it."""
    first, _ = await verified_account(tollhouse, "multi@example.com")
    second = await tollhouse.auth.sign_in_password("multi@example.com", PASSWORD, None)
    session = await tollhouse.auth.authenticate(second.session_token)
    await tollhouse.auth.link_identity(session, "google", sign(idp_keys, claims("google", "m1")))
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate(first.session_token)
    await tollhouse.auth.authenticate(second.session_token)
    # An automatic link by verified address ends them all.
    via_apple = await tollhouse.auth.sign_in_oidc(
        "apple",
        sign(idp_keys, claims("apple", email="multi@example.com", email_verified=True, nonce="m")),
        "m",
    )
    assert via_apple.linked
    with pytest.raises(errors.InvalidSession):
        await tollhouse.auth.authenticate(second.session_token)


async def test_a_password_without_an_address_does_not_count_as_a_way_in(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    sign_in = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", "nomail"))
    )
    assert sign_in.user.emails == []  # no address at all
    hashed = await tollhouse.auth.hasher.hash(PASSWORD)
    async with tollhouse.db.connection() as conn:
        await conn.execute(
            "UPDATE tollhouse.users SET password_hash = %s WHERE id = %s",
            (hashed, sign_in.user.id),
        )
    with pytest.raises(errors.LastCredential):
        await tollhouse.auth.unlink_identity(sign_in.user.id, "google", "nomail")


async def test_a_crit_header_is_malformed_not_a_crash(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    token = sign(idp_keys, claims("google"))
    header = jwt.utils.base64url_encode(b'{"alg":"RS256","kid":"rsa-1","crit":"x"}').decode()
    forged = ".".join([header, *token.split(".")[1:]])
    with pytest.raises(errors.IdTokenMalformed):
        await tollhouse.auth.sign_in_oidc("google", forged)


async def test_a_holder_with_another_unverified_address_is_not_taken_over(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    """The attacker signed up with the victim's address and added one of its own: a claim
    would leave the attacker a way back in (a reset through its own address)."""
    attacker, _ = await tollhouse.auth.sign_up("victim2@example.com", "attacker password")
    await tollhouse.users.add_email(attacker.user.id, "backdoor@evil.example")
    victim = await tollhouse.auth.sign_in_oidc(
        "google", sign(idp_keys, claims("google", email="victim2@example.com", email_verified=True))
    )
    assert victim.created and victim.user.id != attacker.user.id
    assert victim.user.primary_email == "victim2@example.com"
    left = await tollhouse.users.get(attacker.user.id)
    assert [e.email for e in left.emails] == ["backdoor@evil.example"]
    assert left.identities == []


async def test_a_non_ascii_nonce_is_a_mismatch_not_a_crash(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    token = sign(idp_keys, claims("apple", nonce="ascii-nonce"))
    with pytest.raises(errors.NonceMismatch):
        await tollhouse.auth.sign_in_oidc("apple", token, "nönce-ü")


async def test_housekeeping_runs_one_at_a_time_and_stops_on_close(
    dsn: str, identity_config: IdentityConfig
) -> None:
    async with Tollhouse.open(dsn, min_size=1, max_size=2, identity=identity_config) as th:
        th.auth.housekeeping_chance = 1.0
        th.auth._maybe_housekeep()
        first = th.auth._housekeeping
        th.auth._maybe_housekeep()
        assert first is not None and th.auth._housekeeping is first
        await th.auth.close()
        assert first.done()
