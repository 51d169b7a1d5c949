"""The credits HTTP contract of issue 4."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tollhouse.app import Tollhouse
from tollhouse.credits import DebitRequest
from tollhouse.errors import InvalidRequest


@pytest.fixture
async def payer(tollhouse: Tollhouse) -> uuid.UUID:
    return (await tollhouse.users.create(email=f"{uuid.uuid4().hex[:10]}@example.com")).id


async def test_debit_replay_and_rejections(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID, tollhouse: Tollhouse
) -> None:
    body = {"user_id": str(payer), "amount": 10, "turn_id": "t-1", "session_id": "s-1"}
    first = await client.post("/v1/credits/debit", json=body, headers=auth)
    assert first.status_code == 200
    out = first.json()
    assert set(out) == {"ledger_id", "tenant_id", "amount", "balance_after", "status"}
    assert (out["amount"], out["balance_after"], out["status"]) == (10, 90, "applied")
    assert "idempotent-replayed" not in first.headers
    replay = await client.post("/v1/credits/debit", json=body, headers=auth)
    assert replay.json() == out and replay.headers["idempotent-replayed"] == "true"
    conflict = await client.post("/v1/credits/debit", json={**body, "amount": 11}, headers=auth)
    assert (conflict.status_code, conflict.json()["error"]["code"]) == (409, "idempotency_conflict")
    poor = await client.post(
        "/v1/credits/debit", json={**body, "turn_id": "t-2", "amount": 20}, headers=auth
    )
    assert (poor.status_code, poor.json()["error"]["code"]) == (429, "daily_cap_exceeded")
    await tollhouse.credits.set_plan("free", monthly_credits=100, daily_cap=None, overdraft_limit=0)
    await tollhouse.db.transaction(
        lambda conn: conn.execute("UPDATE tollhouse.credit_accounts SET daily_cap = NULL")
    )
    broke = await client.post(
        "/v1/credits/debit", json={**body, "turn_id": "t-3", "amount": 500}, headers=auth
    )
    assert (broke.status_code, broke.json()["error"]["code"]) == (402, "insufficient_credits")
    again = await client.post(
        "/v1/credits/debit", json={**body, "turn_id": "t-3", "amount": 500}, headers=auth
    )
    assert again.status_code == 402 and again.headers["idempotent-replayed"] == "true"
    unknown = await client.post(
        "/v1/credits/debit", json={**body, "user_id": str(uuid.uuid4())}, headers=auth
    )
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "payer_not_found")


@pytest.mark.parametrize(
    "change",
    [
        {"amount": 1.5},
        {"amount": 0},
        {"amount": -3},
        {"amount": 10**16},
        {"amount": "10"},
        {"turn_id": ""},
        {"user_id": None},
        {"reason": "Not A Reason"},
    ],
)
async def test_invalid_debits_are_422_and_write_nothing(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID, change: dict[str, object]
) -> None:
    body = {"user_id": str(payer), "amount": 1, "turn_id": "bad", **change}
    answer = await client.post("/v1/credits/debit", json=body, headers=auth)
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "validation_error")
    ledger = await client.get("/v1/credits/ledger", params={"user_id": str(payer)}, headers=auth)
    assert ledger.status_code == 200 and all(e["kind"] != "debit" for e in ledger.json()["entries"])


@pytest.mark.parametrize(
    "fragment",
    [
        '"metadata": {"score": NaN}',
        '"metadata": {"score": -Infinity}',
        '"metadata": {"note": "half \\ud800 pair"}',
        '"metadata": {"\\u0000": 1}',
        '"turn_id": "lone \\udfff"',
        '"session_id": "nul \\u0000"',
    ],
)
async def test_unstorable_text_and_numbers_are_422_not_500(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID, fragment: str
) -> None:
    """JSON that Python reads but PostgreSQL cannot store (NaN, Infinity, a lone surrogate,
    NUL) is refused at the edge; it used to fail inside the write as a 500."""
    # A repeated key (turn_id) keeps its last value, as Python's JSON reader does.
    raw = f'{{"user_id": "{payer}", "amount": 1, "turn_id": "t-x", {fragment}}}'
    answer = await client.post(
        "/v1/credits/debit",
        content=raw.encode(),
        headers={**auth, "content-type": "application/json"},
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "validation_error")
    ledger = await client.get("/v1/credits/ledger", params={"user_id": str(payer)}, headers=auth)
    assert all(e["kind"] != "debit" for e in ledger.json()["entries"])


async def test_library_debit_refuses_what_postgresql_cannot_store(
    tollhouse: Tollhouse, payer: uuid.UUID
) -> None:
    """The library checks as the HTTP edge does, so a caller in Python gets InvalidRequest
    before anything is queued for a batch (one bad debit must not fail its batch-mates)."""
    bad = [
        DebitRequest(amount=1, turn_id="m", user_id=payer, metadata={"x": float("inf")}),
        DebitRequest(amount=1, turn_id="s\udc00", user_id=payer),
        DebitRequest(amount=True, turn_id="b", user_id=payer),
        DebitRequest(amount=1, turn_id="u", user_id=str(payer)),  # type: ignore[arg-type]
    ]
    for request in bad:
        with pytest.raises(InvalidRequest):
            await tollhouse.credits.debit(request)
    good = await tollhouse.credits.debit(
        DebitRequest(amount=1, turn_id="ok", user_id=payer, metadata={"emoji": "😀"})
    )
    assert good.status == "applied"


@pytest.mark.parametrize(
    "expires_at",
    ["9999-12-31T23:59:59-14:00", "9999-12-31T23:00:00-01:00", "0001-01-01T00:00:00+14:00"],
)
async def test_a_grant_expiry_no_timestamp_reads_back_is_refused(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID, expires_at: str
) -> None:
    """Year 10000 in UTC was stored, and every balance read of the payer failed after."""
    body = {"user_id": str(payer), "amount": 10, "source": "promo", "expires_at": expires_at}
    refused = await client.post("/v1/credits/grants", json=body, headers=auth)
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "invalid_request")
    body["expires_at"] = "9999-12-31T10:00:00-01:00"  # the last day, still in range in UTC
    assert (await client.post("/v1/credits/grants", json=body, headers=auth)).status_code == 200
    balance = await client.get("/v1/credits/balance", params={"user_id": str(payer)}, headers=auth)
    assert balance.status_code == 200 and balance.json()["balance"] == 110


async def test_balance_grants_and_ledger_pages(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID
) -> None:
    grant = await client.post(
        "/v1/credits/grants",
        json={
            "user_id": str(payer),
            "amount": 50,
            "source": "purchase",
            "source_id": "cs_1",
            "priority": 5,
        },
        headers=auth,
    )
    assert grant.status_code == 200 and grant.json()["balance_after"] == 150
    repeat = await client.post(
        "/v1/credits/grants",
        json={
            "user_id": str(payer),
            "amount": 50,
            "source": "purchase",
            "source_id": "cs_1",
            "priority": 5,
        },
        headers=auth,
    )
    assert repeat.json()["replayed"] is True and repeat.json()["balance_after"] == 150
    for i in range(5):
        await client.post(
            "/v1/credits/debit",
            json={"user_id": str(payer), "amount": 1, "turn_id": f"p{i}"},
            headers=auth,
        )
    balance = (
        await client.get("/v1/credits/balance", params={"user_id": str(payer)}, headers=auth)
    ).json()
    assert (balance["balance"], balance["available"], balance["plan"]) == (145, 145, "free")
    assert [g["remaining"] for g in balance["grants"]] == [45, 100]  # priority 5 first
    seen: list[str] = []
    cursor = None
    while True:
        params = {"user_id": str(payer), "limit": "3", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/credits/ledger", params=params, headers=auth)).json()
        seen += [e["id"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7  # 2 grants + 5 debits
    bad_cursor = await client.get(
        "/v1/credits/ledger", params={"user_id": str(payer), "cursor": "nonsense"}, headers=auth
    )
    assert bad_cursor.status_code == 422
    no_payer = await client.get("/v1/credits/balance", headers=auth)
    assert (no_payer.status_code, no_payer.json()["error"]["code"]) == (422, "invalid_request")


async def test_plans_can_be_read_and_changed(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    plans = (await client.get("/v1/plans", headers=auth)).json()["plans"]
    assert [p["name"] for p in plans] == ["free", "starter", "pro", "power"]
    changed = await client.put(
        "/v1/plans",
        json={"plans": [{"name": "team", "monthly_credits": 50000, "overdraft_limit": 1000}]},
        headers=auth,
    )
    assert "team" in [p["name"] for p in changed.json()["plans"]]
    bad = await client.put(
        "/v1/plans", json={"plans": [{"name": "X Y", "monthly_credits": 1}]}, headers=auth
    )
    assert bad.status_code == 422


async def test_credits_routes_are_published(client: httpx.AsyncClient) -> None:
    paths = set((await client.get("/openapi.json")).json()["paths"])
    assert {
        "/v1/credits/debit",
        "/v1/credits/balance",
        "/v1/credits/grants",
        "/v1/credits/ledger",
        "/v1/plans",
    } <= paths


async def test_reservations_and_refunds_over_http(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID
) -> None:
    who = {"user_id": str(payer)}
    held = await client.post(
        "/v1/credits/reservations", json={**who, "turn_id": "r1", "amount": 20}, headers=auth
    )
    assert held.status_code == 200
    assert (held.json()["status"], held.json()["available_after"]) == ("pending", 80)
    done = await client.post(
        "/v1/credits/reservations/r1/commit", json={**who, "amount": 12}, headers=auth
    )
    assert done.status_code == 200 and done.json()["balance_after"] == 88
    again = await client.post(
        "/v1/credits/reservations/r1/commit", json={**who, "amount": 12}, headers=auth
    )
    assert again.json() == done.json() and again.headers["idempotent-replayed"] == "true"
    late = await client.post("/v1/credits/reservations/r1/release", json=who, headers=auth)
    assert (late.status_code, late.json()["error"]["code"]) == (409, "reservation_committed")
    await client.post(
        "/v1/credits/reservations", json={**who, "turn_id": "r2", "amount": 5}, headers=auth
    )
    released = await client.post("/v1/credits/reservations/r2/release", json=who, headers=auth)
    assert released.json()["status"] == "released"
    missing = await client.post("/v1/credits/reservations/nope/release", json=who, headers=auth)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "reservation_not_found")
    refund = await client.post(
        "/v1/credits/refunds", json={"ledger_id": done.json()["ledger_id"]}, headers=auth
    )
    assert refund.json()["refunded"] == 12 and refund.json()["balance_after"] == 100
    too_much = await client.post(
        "/v1/credits/refunds",
        json={"ledger_id": done.json()["ledger_id"], "amount": 13},
        headers=auth,
    )
    assert (too_much.status_code, too_much.json()["error"]["code"]) == (
        422,
        "refund_exceeds_debit",
    )


async def test_a_turn_id_like_an_adjustments_is_refused(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID
) -> None:
    for path in ("/v1/credits/debit", "/v1/credits/reservations"):
        body = {"user_id": str(payer), "amount": 1, "turn_id": "adjustment:fix-1"}
        reply = await client.post(path, json=body, headers=auth)
        assert (reply.status_code, reply.json()["error"]["code"]) == (422, "turn_id_reserved")


async def test_an_adjustment_id_fits_its_turn_id(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID
) -> None:
    """A negative adjustment's turn is `adjustment:<tenant>:<id>`, at most 200 characters,
    and a positive one's grant source `adjustment:<id>`: ids up to 189 apply either way (a
    long one's turn names it by its hash); 190 is the body's 422, not the database's."""
    for amount, size in ((5, 152), (-5, 152), (5, 189), (-5, 189), (-6, 153)):
        adjustment_id = ("up" if amount > 0 else "dn") + "x" * (size - 2)
        body = {
            "user_id": str(payer),
            "amount": amount,
            "note": "x",
            "adjustment_id": adjustment_id,
        }
        reply = await client.post("/v1/credits/adjustments", json=body, headers=auth)
        assert reply.status_code == 200, reply.json()
        again = await client.post("/v1/credits/adjustments", json=body, headers=auth)
        assert again.json()["replayed"] is True
    body = {"user_id": str(payer), "amount": -5, "note": "x", "adjustment_id": "x" * 190}
    reply = await client.post("/v1/credits/adjustments", json=body, headers=auth)
    assert (reply.status_code, reply.json()["error"]["code"]) == (422, "validation_error")


async def test_adjustments_either_way_once_with_a_note(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID, tollhouse: Tollhouse
) -> None:
    body = {"user_id": str(payer), "amount": 40, "adjustment_id": "fix-1", "note": "goodwill"}
    up = await client.post("/v1/credits/adjustments", json=body, headers=auth)
    assert up.status_code == 200 and up.json()["balance_after"] == 140  # + free allowance
    again = await client.post("/v1/credits/adjustments", json=body, headers=auth)
    assert again.json() == {**up.json(), "replayed": True}
    other = await client.post("/v1/credits/adjustments", json={**body, "amount": 41}, headers=auth)
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_conflict")
    # Negative: past the daily cap (free: 25 a day), not counted as the day's usage.
    down = {**body, "amount": -90, "adjustment_id": "fix-2", "note": "clawback"}
    taken = await client.post("/v1/credits/adjustments", json=down, headers=auth)
    assert taken.status_code == 200 and taken.json()["balance_after"] == 50
    balance = await client.get(f"/v1/credits/balance?user_id={payer}", headers=auth)
    assert (balance.json()["balance"], balance.json()["daily_used"]) == (50, 0)
    floor = {**down, "amount": -51, "adjustment_id": "fix-3"}
    refused = await client.post("/v1/credits/adjustments", json=floor, headers=auth)
    assert (refused.status_code, refused.json()["error"]["code"]) == (402, "insufficient_credits")
    for bad in ({"amount": 0}, {"amount": 1.5}, {"note": "  "}, {"note": ""}):
        reply = await client.post(
            "/v1/credits/adjustments", json={**body, "adjustment_id": "x", **bad}, headers=auth
        )
        assert reply.status_code == 422, bad
    ledger = await client.get(f"/v1/credits/ledger?user_id={payer}", headers=auth)
    reasons = [entry["reason"] for entry in ledger.json()["entries"]]
    assert reasons.count("adjustment") == 2
    assert (await tollhouse.health.doctor())[-1].ok  # conservation


async def test_time_zone_moves_the_daily_cap_boundary(
    client: httpx.AsyncClient, auth: dict[str, str], payer: uuid.UUID, tollhouse: Tollhouse
) -> None:
    unknown = await client.put(
        "/v1/credits/time-zone",
        json={"user_id": str(payer), "time_zone": "Mars/Olympus"},
        headers=auth,
    )
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (422, "invalid_request")
    zone = await client.put(
        "/v1/credits/time-zone",
        json={"user_id": str(payer), "time_zone": "Pacific/Kiritimati"},
        headers=auth,
    )
    assert zone.status_code == 200 and zone.json()["time_zone"] == "Pacific/Kiritimati"
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT (now() AT TIME ZONE 'Pacific/Kiritimati')::date,"
            " (now() AT TIME ZONE 'UTC')::date"
        )
        row = await cur.fetchone()
    assert row is not None
    debit = {"user_id": str(payer), "amount": 5, "turn_id": "tz-1"}
    assert (await client.post("/v1/credits/debit", json=debit, headers=auth)).status_code == 200
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT day_start FROM tollhouse.credit_accounts a JOIN tollhouse.tenants t"
            " ON t.id = a.tenant_id WHERE t.owner_user_id = %s AND t.is_default",
            (payer,),
        )
        day = await cur.fetchone()
    assert day == (row[0],)  # the day is Kiritimati's (UTC+14), not UTC's
