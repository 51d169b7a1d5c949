"""The identity HTTP API: users (service key), auth (service key), me (session token)."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import pytest

from tests.support.flows import verified_account
from tests.support.idp import KeySet, claims, sign
from tollhouse import errors
from tollhouse.app import Tollhouse
from tollhouse.identity import IdentityConfig

PASSWORD = "correct horse battery"


async def _signup(client: httpx.AsyncClient, auth: dict[str, str], email: str) -> dict[str, Any]:
    answer = await client.post(
        "/v1/auth/password/signup", json={"email": email, "password": PASSWORD}, headers=auth
    )
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_user_lifecycle(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    created = await client.post(
        "/v1/users", json={"email": "Lin@Example.com", "display_name": "Lin"}, headers=auth
    )
    assert created.status_code == 201
    user = created.json()
    assert user["email"] == "lin@example.com" and user["plan"] == "free"
    assert user["personal_tenant_id"] and user["roles"] == ["user"]
    assert user["emails"][0]["is_primary"] and user["identities"] == []
    uid = user["id"]
    assert (await client.get(f"/v1/users/{uid}", headers=auth)).json()["id"] == uid
    found = await client.get("/v1/users", params={"email": " LIN@example.com"}, headers=auth)
    assert [u["id"] for u in found.json()["users"]] == [uid]
    none = await client.get("/v1/users", params={"email": "nobody@example.com"}, headers=auth)
    assert none.json() == {"users": []}
    patched = await client.patch(
        f"/v1/users/{uid}", json={"plan_override": "pro", "username": "lin"}, headers=auth
    )
    assert patched.json()["plan"] == "pro" and patched.json()["display_name"] == "Lin"
    role = await client.post(f"/v1/users/{uid}/roles", json={"role": "admin"}, headers=auth)
    assert role.json()["roles"] == ["admin", "user"]
    deleted = await client.delete(f"/v1/users/{uid}", headers=auth)
    assert deleted.json()["deleted_at"] is not None
    gone = await client.get(f"/v1/users/{uid}", headers=auth)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "user_not_found"
    kept = await client.get(f"/v1/users/{uid}", params={"include_deleted": True}, headers=auth)
    assert kept.status_code == 200
    restored = await client.post(f"/v1/users/{uid}/restore", headers=auth)
    assert restored.json()["deleted_at"] is None


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"email": "not-an-address"}, 422, "invalid_email"),
        ({"email": "x@example.com", "display_name": "n" * 201}, 422, "validation_error"),
        ({"email": "x@example.com", "password": "short"}, 422, "invalid_password"),
        ({"email": "x@example.com", "role": "admin"}, 422, "validation_error"),
        ({"email": 42}, 422, "validation_error"),
    ],
)
async def test_bad_user_bodies_write_nothing(
    client: httpx.AsyncClient, auth: dict[str, str], body: dict[str, object], status: int, code: str
) -> None:
    answer = await client.post("/v1/users", json=body, headers=auth)
    assert (answer.status_code, answer.json()["error"]["code"]) == (status, code)
    found = await client.get("/v1/users", params={"email": "x@example.com"}, headers=auth)
    assert found.json() == {"users": []}


async def test_duplicate_email_is_409(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    await client.post("/v1/users", json={"email": "dup@example.com"}, headers=auth)
    again = await client.post("/v1/users", json={"email": "DUP@example.com"}, headers=auth)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "email_taken")


async def test_unknown_user_is_404_and_bad_id_is_422(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    missing = await client.get("/v1/users/00000000-0000-7000-8000-000000000000", headers=auth)
    assert missing.status_code == 404
    assert (await client.get("/v1/users/not-a-uuid", headers=auth)).status_code == 422


async def test_password_sign_in_and_enumeration(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    signup = await _signup(client, auth, "enum@example.com")
    assert signup["created"] is True and signup["verification_token"]["token"].startswith("thv_")
    ok = await client.post(
        "/v1/auth/password/login",
        json={"email": "enum@example.com", "password": PASSWORD, "client_ip": "10.0.0.1"},
        headers=auth,
    )
    assert ok.status_code == 200 and ok.json()["user"]["email"] == "enum@example.com"
    wrong = await client.post(
        "/v1/auth/password/login",
        json={"email": "enum@example.com", "password": "wrong password"},
        headers=auth,
    )
    unknown = await client.post(
        "/v1/auth/password/login",
        json={"email": "nobody@example.com", "password": "wrong password"},
        headers=auth,
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["error"]["code"] == "invalid_credentials"


async def test_throttled_sign_in_is_429(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    await _signup(client, auth, "t@example.com")
    body = {"email": "t@example.com", "password": "wrong password", "client_ip": "10.0.0.9"}
    statuses = [
        (await client.post("/v1/auth/password/login", json=body, headers=auth)).status_code
        for _ in range(21)
    ]
    assert statuses == [401] * 20 + [429]


async def test_oidc_over_http(
    client: httpx.AsyncClient, auth: dict[str, str], idp_keys: KeySet
) -> None:
    token = sign(idp_keys, claims("google", "http-sub", email="g@gmail.com", email_verified=True))
    answer = await client.post("/v1/auth/oidc/google", json={"id_token": token}, headers=auth)
    assert answer.status_code == 200
    body = answer.json()
    assert (body["created"], body["linked"]) == (True, False)
    assert body["user"]["identities"][0]["subject"] == "http-sub"
    bad = await client.post(
        "/v1/auth/oidc/google",
        json={"id_token": sign(idp_keys, claims("google", aud="nope"))},
        headers=auth,
    )
    assert (bad.status_code, bad.json()["error"]["code"]) == (401, "id_token_wrong_audience")
    other = await client.post("/v1/auth/oidc/facebook", json={"id_token": token}, headers=auth)
    assert other.status_code == 422


async def test_me_endpoints_need_a_session_and_show_only_mine(
    client: httpx.AsyncClient, auth: dict[str, str], service_key: str
) -> None:
    mine = await _signup(client, auth, "me@example.com")
    await _signup(client, auth, "someone@example.com")
    session = _bearer(mine["session_token"])
    assert (await client.get("/v1/me")).status_code == 401
    assert (await client.get("/v1/me", headers=_bearer(service_key))).json()["error"][
        "code"
    ] == "invalid_session"
    me = await client.get("/v1/me", headers=session)
    assert me.json()["email"] == "me@example.com"
    emails = await client.get("/v1/me/emails", headers=session)
    assert [e["email"] for e in emails.json()["emails"]] == ["me@example.com"]
    assert (await client.get("/v1/me/identities", headers=session)).json() == {"identities": []}
    sessions = await client.get("/v1/me/sessions", headers=session)
    assert len(sessions.json()["sessions"]) == 1
    patched = await client.patch("/v1/me", json={"display_name": "Me!"}, headers=session)
    assert patched.json()["display_name"] == "Me!"
    forbidden = await client.patch("/v1/me", json={"plan_override": "power"}, headers=session)
    assert forbidden.status_code == 422  # not a field an end user may set
    prefs = await client.patch("/v1/me/preferences", json={"marketing": False}, headers=session)
    assert prefs.json()["marketing"] is False
    assert (await client.get("/v1/me/preferences", headers=session)).json()["marketing"] is False


async def test_username_conflict_through_me_is_409(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    first = await _signup(client, auth, "u1@example.com")
    second = await _signup(client, auth, "u2@example.com")
    await client.patch(
        "/v1/me", json={"username": "taken"}, headers=_bearer(first["session_token"])
    )
    clash = await client.patch(
        "/v1/me", json={"username": "TAKEN"}, headers=_bearer(second["session_token"])
    )
    assert (clash.status_code, clash.json()["error"]["code"]) == (409, "username_taken")


async def test_logout_verify_and_reset_over_http(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    signup = await _signup(client, auth, "flow@example.com")
    out = await client.post(
        "/v1/auth/logout", json={"session_token": signup["session_token"]}, headers=auth
    )
    assert out.status_code == 204
    assert (await client.get("/v1/me", headers=_bearer(signup["session_token"]))).status_code == 401
    verified = await client.post(
        "/v1/auth/email/verify", json={"token": signup["verification_token"]["token"]}, headers=auth
    )
    assert verified.json()["emails"][0]["verified"] is True
    reused = await client.post(
        "/v1/auth/email/verify", json={"token": signup["verification_token"]["token"]}, headers=auth
    )
    assert (reused.status_code, reused.json()["error"]["code"]) == (400, "token_used")
    request = await client.post(
        "/v1/auth/password/reset-request", json={"email": "flow@example.com"}, headers=auth
    )
    token = request.json()["reset"]["token"]
    unknown = await client.post(
        "/v1/auth/password/reset-request", json={"email": "nobody@example.com"}, headers=auth
    )
    assert unknown.json() == {"reset": None}
    reset = await client.post(
        "/v1/auth/password/reset",
        json={"token": token, "new_password": "a brand new password"},
        headers=auth,
    )
    assert reset.status_code == 200
    garbage = await client.post(
        "/v1/auth/password/reset",
        json={"token": "thr_nonsense", "new_password": "a brand new password"},
        headers=auth,
    )
    assert (garbage.status_code, garbage.json()["error"]["code"]) == (400, "invalid_token")


async def test_link_and_unlink_over_http(
    client: httpx.AsyncClient, auth: dict[str, str], idp_keys: KeySet
) -> None:
    signup = await _signup(client, auth, "link@example.com")
    refused = await client.post(
        "/v1/me/identities",
        json={"provider": "google", "id_token": sign(idp_keys, claims("google", "lk"))},
        headers=_bearer(signup["session_token"]),
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (
        403,
        "verified_email_required",
    )
    await client.post(
        "/v1/auth/email/verify", json={"token": signup["verification_token"]["token"]}, headers=auth
    )
    login = await client.post(
        "/v1/auth/password/login",
        json={"email": "link@example.com", "password": PASSWORD},
        headers=auth,
    )
    session = _bearer(login.json()["session_token"])
    linked = await client.post(
        "/v1/me/identities",
        json={"provider": "google", "id_token": sign(idp_keys, claims("google", "lk"))},
        headers=session,
    )
    assert linked.status_code == 201
    assert [i["subject"] for i in linked.json()["identities"]] == ["lk"]
    unlinked = await client.delete("/v1/me/identities/google/lk", headers=session)
    assert unlinked.json()["identities"] == []
    missing = await client.delete("/v1/me/identities/google/lk", headers=session)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "identity_not_found")


async def test_a_link_nonce_over_http_binds_the_link_to_its_session(
    client: httpx.AsyncClient, auth: dict[str, str], idp_keys: KeySet, tollhouse: Tollhouse
) -> None:
    """RELIABILITY A-08: a link request forged in the victim's browser carries the forger's
    token, whose nonce was given to the forger's session, not the victim's."""
    sessions = {}
    for who in ("victim", "forger"):
        sign_in, _ = await verified_account(tollhouse, f"{who}-link@example.com")
        sessions[who] = _bearer(sign_in.session_token)
    issued = {}
    for who, session in sessions.items():
        answer = await client.post("/v1/me/identities/nonce", headers=session)
        assert answer.status_code == 201 and set(answer.json()) == {"nonce", "expires_at"}
        issued[who] = answer.json()["nonce"]

    def link(subject: str, nonce: str) -> dict[str, str]:
        token = sign(idp_keys, claims("google", subject, nonce=nonce))
        return {"provider": "google", "id_token": token, "nonce": nonce}

    forged = await client.post(
        "/v1/me/identities", json=link("forger-g", issued["forger"]), headers=sessions["victim"]
    )
    assert (forged.status_code, forged.json()["error"]["code"]) == (403, "link_nonce_invalid")
    own = await client.post(
        "/v1/me/identities", json=link("victim-g", issued["victim"]), headers=sessions["victim"]
    )
    assert own.status_code == 201
    assert [i["subject"] for i in own.json()["identities"]] == ["victim-g"]
    again = await client.post(
        "/v1/me/identities", json=link("victim-g2", issued["victim"]), headers=sessions["victim"]
    )
    assert (again.status_code, again.json()["error"]["code"]) == (403, "link_nonce_invalid")
    # The forger's own session may still use its nonce: the refusal did not spend it.
    forgers = await client.post(
        "/v1/me/identities", json=link("forger-g", issued["forger"]), headers=sessions["forger"]
    )
    assert forgers.status_code == 201


async def test_linking_can_require_a_link_nonce(
    service_dsn: str, identity_config: IdentityConfig, idp_keys: KeySet
) -> None:
    config = dataclasses.replace(identity_config, link_nonce_required=True)
    async with Tollhouse.open(service_dsn, min_size=1, max_size=2, identity=config) as th:
        _, session = await verified_account(th, "strict-link@example.com")
        with pytest.raises(errors.LinkNonceRequired):
            await th.auth.link_identity(session, "google", sign(idp_keys, claims("google", "s1")))
        made_up = sign(idp_keys, claims("google", "s1", nonce="the-apps-own"))
        with pytest.raises(errors.LinkNonceRequired):
            await th.auth.link_identity(session, "google", made_up, "the-apps-own")
        nonce, _ = await th.auth.link_nonce(session)
        async with th.db.connection() as conn:
            await conn.execute(
                "UPDATE tollhouse.identity_link_nonces SET expires_at = now() - interval '1 s'"
            )
        expired = sign(idp_keys, claims("google", "s1", nonce=nonce))
        with pytest.raises(errors.LinkNonceInvalid):
            await th.auth.link_identity(session, "google", expired, nonce)
        nonce, _ = await th.auth.link_nonce(session)
        user = await th.auth.link_identity(
            session, "google", sign(idp_keys, claims("google", "s1", nonce=nonce)), nonce
        )
        assert [i.subject for i in user.identities] == ["s1"]


async def test_identity_routes_are_published(client: httpx.AsyncClient) -> None:
    paths = set((await client.get("/openapi.json")).json()["paths"])
    assert {
        "/v1/users",
        "/v1/users/{user_id}",
        "/v1/auth/password/signup",
        "/v1/auth/password/login",
        "/v1/auth/oidc/{provider}",
        "/v1/auth/logout",
        "/v1/me",
        "/v1/me/emails",
        "/v1/me/identities",
        "/v1/me/preferences",
    } <= paths


async def test_without_client_ip_only_accounts_are_throttled(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    """Tollhouse sees only the app's address; counting it would lock everyone out."""
    statuses = set()
    for i in range(25):
        answer = await client.post(
            "/v1/auth/password/login",
            json={"email": f"someone{i}@example.com", "password": "wrong password"},
            headers=auth,
        )
        statuses.add(answer.status_code)
    assert statuses == {401}


async def test_nul_bytes_get_a_4xx(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    answer = await client.post(
        "/v1/auth/password/signup",
        json={"email": "n@example.com", "password": PASSWORD, "display_name": "a\u0000b"},
        headers=auth,
    )
    assert answer.status_code == 422
    meta = await client.post("/v1/users", json={"email": "m@example.com"}, headers=auth)
    patched = await client.patch(
        f"/v1/users/{meta.json()['id']}", json={"metadata": {"k": "a\u0000b"}}, headers=auth
    )
    assert patched.status_code == 422
