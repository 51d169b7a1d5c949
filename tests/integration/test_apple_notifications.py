"""Sign in with Apple's server-to-server notifications (RELIABILITY A-07): valid ones act once
each, a repeated delivery changes nothing, anything not signed by Apple for us is refused
with nothing written. Apple is played by key sets the tests generate (tests/support/idp.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.flows import verified_account
from tests.support.idp import APPLE_CLIENT, APPLE_ISSUER, KeySet, claims, sign
from tollhouse import errors
from tollhouse.app import Tollhouse
from tollhouse.identity import SignIn

RELAY = "abc123@privaterelay.appleid.com"


def notification(
    keys: KeySet, kind: str, subject: str, *, event_time: float | None = None, **overrides: Any
) -> str:
    """A notification as Apple signs it: `events` is a JSON string, times in milliseconds."""
    now = int(time.time())
    event: dict[str, Any] = {
        "type": kind,
        "sub": subject,
        "event_time": int((event_time or time.time()) * 1000),
    }
    if kind.startswith("email-"):
        event |= {"email": RELAY, "is_private_email": "true"}
    payload: dict[str, Any] = {
        "iss": APPLE_ISSUER,
        "aud": APPLE_CLIENT,
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "events": json.dumps(event),
    }
    payload.update(overrides)
    return sign(keys, {k: v for k, v in payload.items() if v is not None})


async def apple_user(tollhouse: Tollhouse, keys: KeySet, subject: str) -> SignIn:
    """A user who signed up with Apple through a relay address."""
    token = sign(
        keys,
        claims(
            "apple",
            subject,
            email=RELAY,
            email_verified="true",
            is_private_email="true",
            nonce=subject,
        ),
    )
    return await tollhouse.auth.sign_in_oidc("apple", token, subject)


async def apple_sign_in(tollhouse: Tollhouse, keys: KeySet, subject: str) -> SignIn:
    token = sign(keys, claims("apple", subject, nonce="again-" + uuid.uuid4().hex))
    return await tollhouse.auth.sign_in_oidc("apple", token, claims_nonce(token))


def claims_nonce(token: str) -> str:
    import jwt

    return str(jwt.decode(token, options={"verify_signature": False})["nonce"])


async def session_alive(tollhouse: Tollhouse, sign_in: SignIn) -> bool:
    try:
        await tollhouse.auth.authenticate(sign_in.session_token)
    except errors.InvalidSession:
        return False
    return True


def stored(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT type, subject, outcome FROM tollhouse.apple_notifications ORDER BY received_at"
        ).fetchall()


async def test_consent_revoked_ends_apples_sessions_once(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    first = await apple_user(tollhouse, idp_keys, "apple-consent")
    token = notification(idp_keys, "consent-revoked", "apple-consent")
    result = await tollhouse.auth.receive_apple_notification(token)
    assert (result.type, result.outcome, result.duplicate) == ("consent-revoked", "applied", False)
    assert not await session_alive(tollhouse, first)
    # Signing in with Apple again is a new consent, to the same user; the notification
    # delivered again changes nothing, so this session survives it.
    again = await apple_sign_in(tollhouse, idp_keys, "apple-consent")
    assert again.user.id == first.user.id and not again.created
    repeat = await tollhouse.auth.receive_apple_notification(token)
    assert (repeat.outcome, repeat.duplicate) == ("applied", True)
    assert await session_alive(tollhouse, again)
    assert stored(dsn) == [("consent-revoked", "apple-consent", "applied")]


async def test_consent_revoked_keeps_the_sessions_of_other_ways_in(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    password, _ = await verified_account(tollhouse, "both@example.com")
    session = await tollhouse.auth.authenticate(password.session_token)
    await tollhouse.auth.link_identity(
        session, "apple", sign(idp_keys, claims("apple", "apple-both", nonce="b")), "b"
    )
    via_apple = await apple_sign_in(tollhouse, idp_keys, "apple-both")
    await tollhouse.auth.receive_apple_notification(
        notification(idp_keys, "consent-revoked", "apple-both")
    )
    assert not await session_alive(tollhouse, via_apple)
    assert await session_alive(tollhouse, password)
    user = await tollhouse.users.get(password.user.id)
    assert [i.subject for i in user.identities] == ["apple-both"]  # the link stays


async def test_a_revocation_older_than_a_sign_in_leaves_that_session(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    before = time.time() - 60
    signed_in = await apple_user(tollhouse, idp_keys, "apple-late")
    await tollhouse.auth.receive_apple_notification(
        notification(idp_keys, "consent-revoked", "apple-late", event_time=before)
    )
    assert await session_alive(tollhouse, signed_in)


@pytest.mark.parametrize("kind", ["account-delete", "account-deleted"])
async def test_account_delete_unlinks_the_identity_even_the_last_way_in(
    tollhouse: Tollhouse, idp_keys: KeySet, kind: str
) -> None:
    signed_in = await apple_user(tollhouse, idp_keys, "apple-gone-" + kind)
    result = await tollhouse.auth.receive_apple_notification(
        notification(idp_keys, kind, "apple-gone-" + kind)
    )
    assert result.outcome == "applied"
    assert not await session_alive(tollhouse, signed_in)
    user = await tollhouse.users.get(signed_in.user.id)
    assert user.identities == [] and user.deleted_at is None
    assert await tollhouse.users.find_by_identity("apple", "apple-gone-" + kind) is None


async def test_email_forwarding_off_and_on_marks_the_address_in_event_order(
    tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    signed_in = await apple_user(tollhouse, idp_keys, "apple-mail")
    now = time.time()

    async def deliverable() -> bool:
        user = await tollhouse.users.get(signed_in.user.id)
        (address,) = user.emails
        return address.deliverable

    assert await deliverable()
    receive = tollhouse.auth.receive_apple_notification
    await receive(notification(idp_keys, "email-disabled", "apple-mail", event_time=now - 10))
    assert not await deliverable()
    await receive(notification(idp_keys, "email-enabled", "apple-mail", event_time=now))
    assert await deliverable()
    # An older event delivered late changes nothing.
    await receive(notification(idp_keys, "email-disabled", "apple-mail", event_time=now - 5))
    assert await deliverable()
    assert await session_alive(tollhouse, signed_in)


async def test_unknown_subjects_and_types_are_kept_and_change_nothing(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    signed_in = await apple_user(tollhouse, idp_keys, "apple-known")
    receive = tollhouse.auth.receive_apple_notification
    stranger = await receive(notification(idp_keys, "consent-revoked", "apple-nobody"))
    assert stranger.outcome == "unknown_subject"
    odd = await receive(notification(idp_keys, "something-new", "apple-known"))
    assert (odd.type, odd.outcome) == ("something-new", "ignored")
    assert await session_alive(tollhouse, signed_in)
    assert [row[2] for row in stored(dsn)] == ["unknown_subject", "ignored"]


def _other_keys() -> KeySet:
    return KeySet()  # same kids, other keys: a forgery


BAD_NOTIFICATIONS: dict[str, tuple[Any, str]] = {
    "forged": (
        lambda k: notification(_other_keys(), "consent-revoked", "apple-target"),
        "id_token_bad_signature",
    ),
    "expired": (
        lambda k: notification(k, "consent-revoked", "apple-target", exp=int(time.time()) - 61),
        "id_token_expired",
    ),
    "wrong audience": (
        lambda k: notification(k, "consent-revoked", "apple-target", aud="com.other.app"),
        "id_token_wrong_audience",
    ),
    "wrong issuer": (
        lambda k: notification(k, "consent-revoked", "apple-target", iss="https://evil.example"),
        "id_token_wrong_issuer",
    ),
    "no jti": (
        lambda k: notification(k, "consent-revoked", "apple-target", jti=None),
        "id_token_bad_claims",
    ),
    "events not JSON": (
        lambda k: notification(k, "consent-revoked", "apple-target", events="{not json"),
        "id_token_bad_claims",
    ),
    "event without a subject": (
        lambda k: notification(k, "consent-revoked", "x", events=json.dumps({"type": "x"})),
        "id_token_bad_claims",
    ),
    "not a JWT": (lambda k: "not.a.jwt", "id_token_malformed"),
}


@pytest.mark.parametrize("case", list(BAD_NOTIFICATIONS))
async def test_a_notification_not_signed_by_apple_for_us_changes_nothing(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet, case: str
) -> None:
    signed_in = await apple_user(tollhouse, idp_keys, "apple-target")
    make, code = BAD_NOTIFICATIONS[case]
    with pytest.raises(errors.IdTokenRejected) as caught:
        await tollhouse.auth.receive_apple_notification(make(idp_keys))
    assert caught.value.code == code
    assert await session_alive(tollhouse, signed_in)
    assert stored(dsn) == []


async def test_the_http_endpoint_needs_no_service_key_and_is_published(
    dsn: str, tollhouse: Tollhouse, client: httpx.AsyncClient, idp_keys: KeySet
) -> None:
    signed_in = await apple_user(tollhouse, idp_keys, "apple-http")
    token = notification(idp_keys, "consent-revoked", "apple-http")
    path = "/v1/auth/apple/notifications"
    answer = await client.post(path, json={"payload": token})
    assert answer.status_code == 200
    body = answer.json()
    assert {k: body[k] for k in ("type", "outcome", "duplicate")} == {
        "type": "consent-revoked",
        "outcome": "applied",
        "duplicate": False,
    }
    assert not await session_alive(tollhouse, signed_in)
    assert (await client.post(path, json={"payload": token})).json()["duplicate"] is True
    forged = await client.post(
        path, json={"payload": notification(_other_keys(), "account-delete", "apple-http")}
    )
    assert forged.status_code == 401
    assert forged.json()["error"]["code"] == "id_token_bad_signature"
    missing = await client.post(path, json={"token": token})
    assert missing.status_code == 422
    assert len(stored(dsn)) == 1
    spec = (await client.get("/openapi.json")).json()
    assert "post" in spec["paths"][path]


async def test_concurrent_deliveries_of_one_notification_act_once(
    dsn: str, tollhouse: Tollhouse, idp_keys: KeySet
) -> None:
    signed_in = await apple_user(tollhouse, idp_keys, "apple-burst")
    token = notification(idp_keys, "account-delete", "apple-burst")
    results = await asyncio.gather(
        *(tollhouse.auth.receive_apple_notification(token) for _ in range(8))
    )
    assert sorted(r.duplicate for r in results) == [False] + [True] * 7
    with psycopg.connect(dsn) as conn:
        events = conn.execute(
            "SELECT count(*) FROM tollhouse.identity_events"
            " WHERE user_id = %s AND kind = 'apple_account_delete'",
            (signed_in.user.id,),
        ).fetchone()
    assert events == (1,)
