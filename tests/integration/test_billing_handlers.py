"""Billing handlers through the webhook: credit packs, lifetime deals, refunds, failures
stored with their reason and replayed, the effective plan's order of precedence, RLS."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support import billing as b
from tests.support import fake_stripe as fs
from tollhouse.app import Tollhouse
from tollhouse.billing.service import Incoming, queries, receive_params
from tollhouse.errors import DatabaseUnavailable, TollhouseError


async def rows(tollhouse: Tollhouse, sql: Any, *params: Any) -> list[tuple[Any, ...]]:
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall()


def paid_session(customer: str, user_id: uuid.UUID, price_id: str, payment: str) -> dict[str, Any]:
    return fs.shape(
        "checkout.session",
        id=fs.new_id("cs_test"),
        mode="payment",
        customer=customer,
        client_reference_id=str(user_id),
        payment_status="paid",
        payment_intent=payment,
        amount_total=1000,
        metadata={"tollhouse_price_id": price_id},
    )


async def _a_lock_wait(
    conn: psycopg.AsyncConnection[Any], task: asyncio.Task[Any] | None = None
) -> bool:
    """Whether a transaction waits for an advisory lock in this database (a customer's or an
    event's), polled for up to 5 s; stops early when `task` ends (it never waited)."""
    for _ in range(500):
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        if (await cur.fetchone() or (0,))[0]:
            return True
        if task is not None and task.done():
            return False
        await asyncio.sleep(0.01)
    return False


def _unlinked_pack_session(customer: str) -> dict[str, Any]:
    """A paid credit-pack Checkout naming only its customer (no client_reference_id)."""
    return fs.shape(
        "checkout.session",
        id=fs.new_id("cs_test"),
        mode="payment",
        customer=customer,
        client_reference_id=None,
        payment_status="paid",
        payment_intent=fs.new_id("pi"),
        amount_total=1000,
        metadata={"tollhouse_price_id": b.PACK},
    )


def refund(payment: str, refunded: int, amount: int = 1000) -> dict[str, Any]:
    return fs.shape(
        "charge",
        id=fs.new_id("ch"),
        payment_intent=payment,
        amount=amount,
        amount_refunded=refunded,
        refunded=refunded >= amount,
    )


async def balance(client: httpx.AsyncClient, auth: dict[str, str], user: uuid.UUID) -> int:
    body = (await client.get(f"/v1/credits/balance?user_id={user}", headers=auth)).json()
    return int(body["balance"])


async def test_credit_pack_grants_once_and_a_refund_takes_back_what_is_unspent(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    session = paid_session(c.customer_id, c.user_id, b.PACK, "pi_pack")
    completed = fs.event("checkout.session.completed", session)
    assert (await b.ok(client, completed))["status"] == "processed"
    assert (await b.ok(client, fs.event("checkout.session.completed", session)))["status"] == (
        "processed"
    )  # another event for the same session: the pack is granted once per session
    assert await balance(client, auth, c.user_id) == 100 + 500

    spend = {"user_id": str(c.user_id), "amount": 25, "turn_id": "t1"}
    assert (await client.post("/v1/credits/debit", json=spend, headers=auth)).status_code == 200
    # The pack is spent first (priority 10): 475 of it is left.
    half = fs.event("charge.refunded", refund("pi_pack", 500))
    assert (await b.ok(client, half))["status"] == "processed"
    assert await balance(client, auth, c.user_id) == 575 - 250
    full = refund("pi_pack", 1000)
    await b.ok(client, fs.event("charge.refunded", full))
    await b.ok(client, fs.event("charge.refunded", full))  # cumulative amount: a repeat is a no-op
    assert await balance(client, auth, c.user_id) == 100
    (row,) = await rows(
        tollhouse, "SELECT taken_back, unrecovered FROM tollhouse.credit_pack_purchases"
    )
    assert row == (475, 25)  # what was spent is reported, not turned into debt


async def test_the_billing_view_shows_the_lifetime_deal_that_sets_the_plan(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    await b.load_prices(client)
    starter = fs.price(
        "price_lifetime_starter",
        recurring=False,
        tollhouse_plan="starter",
        tollhouse_lifetime="true",
    )
    await b.ok(client, fs.event("price.created", starter))
    c = await b.linked_customer(client, auth)
    for price, payment in ((starter["id"], "pi_life_starter"), (b.LIFETIME, "pi_life_power")):
        session = paid_session(c.customer_id, c.user_id, price, payment)
        assert (await b.ok(client, fs.event("checkout.session.completed", session)))[
            "status"
        ] == "processed"
    view = (await client.get(f"/v1/users/{c.user_id}/billing", headers=auth)).json()
    assert (view["plan"], view["lifetime"]["plan"]) == ("power", "power")


async def test_a_refund_delivered_while_its_purchase_commits_is_applied(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, dsn: str
) -> None:
    """The purchase's transaction is open (applied, not committed) when the refund arrives.
    Without a lock between them, the refund found no purchase (stored `ignored`), the
    purchase could not see the refund's uncommitted event, and the credits were kept."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    session = paid_session(c.customer_id, c.user_id, b.PACK, "pi_race")
    checkout = Incoming.read(json.dumps(fs.event("checkout.session.completed", session)).encode())
    refunded = Incoming.read(
        json.dumps(fs.event("charge.refunded", refund("pi_race", 1000))).encode()
    )
    billing = tollhouse.billing
    applied, release = asyncio.Event(), asyncio.Event()

    async def purchase(conn: Any) -> Any:  # held open after applying
        delivery = await billing._store_and_apply(conn, checkout)
        applied.set()
        await release.wait()
        return delivery

    bought = asyncio.create_task(tollhouse.db.transaction(purchase))
    await applied.wait()
    refunding = asyncio.create_task(billing._take(refunded))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watcher:
        waited = await _a_lock_wait(watcher, refunding)
    release.set()
    assert (await bought).status == "processed"
    assert (await refunding).status == "processed"
    assert waited
    assert await balance(client, auth, c.user_id) == 100  # the pack taken back
    (row,) = await rows(tollhouse, "SELECT taken_back FROM tollhouse.credit_pack_purchases")
    assert row == (500,)


async def test_lifetime_deal_sets_the_plan_until_refunded(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    session = paid_session(c.customer_id, c.user_id, b.LIFETIME, "pi_life")
    assert (await b.ok(client, fs.event("checkout.session.completed", session)))["status"] == (
        "processed"
    )
    billing = (await client.get(f"/v1/users/{c.user_id}/billing", headers=auth)).json()
    assert billing["plan"] == "power" and billing["lifetime"]["plan"] == "power"
    assert billing["subscription"] is None
    assert await balance(client, auth, c.user_id) == 20000
    await b.ok(client, fs.event("charge.refunded", refund("pi_life", 1000)))
    billing = (await client.get(f"/v1/users/{c.user_id}/billing", headers=auth)).json()
    assert billing["plan"] == "free" and billing["lifetime"] is None
    user = (await client.get(f"/v1/users/{c.user_id}", headers=auth)).json()
    assert user["plan"] == "free"


async def test_effective_plan_override_then_subscription_then_lifetime_then_free(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    life = paid_session(c.customer_id, c.user_id, b.LIFETIME, "pi_l2")
    await b.ok(client, fs.event("checkout.session.completed", life))
    start, end = b.period()
    sub = fs.subscription("sub_prec", c.customer_id, b.PRICES[b.STARTER], start=start, end=end)
    await b.ok(client, fs.event("customer.subscription.created", sub, created=10))

    async def plan() -> tuple[str, str]:
        user = (await client.get(f"/v1/users/{c.user_id}", headers=auth)).json()
        credits = (
            await client.get(f"/v1/credits/balance?user_id={c.user_id}", headers=auth)
        ).json()
        return user["plan"], credits["plan"]

    assert await plan() == ("starter", "starter")
    patch = await client.patch(
        f"/v1/users/{c.user_id}", json={"plan_override": "pro"}, headers=auth
    )
    assert patch.json()["plan"] == "pro"
    assert await plan() == ("pro", "pro")
    await client.patch(f"/v1/users/{c.user_id}", json={"plan_override": None}, headers=auth)
    assert await plan() == ("starter", "starter")
    past_due = {**sub, "status": "past_due"}
    await b.ok(client, fs.event("customer.subscription.updated", past_due, created=20))
    assert await plan() == ("starter", "starter")  # past_due still counts
    await b.ok(
        client, fs.event("customer.subscription.deleted", {**sub, "status": "canceled"}, created=30)
    )
    assert await plan() == ("power", "power")  # the lifetime deal
    await b.ok(client, fs.event("charge.refunded", refund("pi_l2", 1000)))
    assert await plan() == ("free", "free")


async def test_unknown_price_is_failed_with_its_reason_and_replayable(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    c = await b.linked_customer(client, auth)
    mystery = fs.price("price_mystery")  # no tollhouse_* metadata, not synced
    start, end = b.period()
    sub = fs.subscription("sub_m", c.customer_id, mystery, start=start, end=end)
    event = fs.event("customer.subscription.created", sub)
    answer = await b.ok(client, event)
    assert answer["status"] == "failed" and "unknown price price_mystery" in answer["error"]
    assert await rows(tollhouse, "SELECT * FROM tollhouse.subscriptions") == []
    stored = (await client.get(f"/v1/stripe/events/{event['id']}", headers=auth)).json()
    assert stored["status"] == "failed" and stored["attempts"] == 1
    assert "unknown price" in stored["last_error"]

    fixed = fs.price("price_mystery", tollhouse_plan="pro")
    await b.ok(client, fs.event("price.updated", fixed, created=5))
    retried = await client.post(f"/v1/stripe/events/{event['id']}/retry", headers=auth)
    assert retried.status_code == 200 and retried.json()["status"] == "processed"
    assert await rows(tollhouse, "SELECT plan FROM tollhouse.subscriptions") == [("pro",)]
    stored = (await client.get(f"/v1/stripe/events/{event['id']}", headers=auth)).json()
    assert stored["attempts"] == 2 and stored["last_error"] is None
    missing = await client.post("/v1/stripe/events/evt_nope/retry", headers=auth)
    assert (missing.status_code, missing.json()["error"]["code"]) == (
        404,
        "billing_event_not_found",
    )


async def test_business_problems_are_failed_not_500(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    user_id, _ = await b.new_user(client, auth)
    bad_plan = fs.price("price_gold", tollhouse_plan="gold")
    answer = await b.ok(client, fs.event("price.created", bad_plan))
    assert answer["status"] == "failed" and "unknown plan 'gold'" in answer["error"]
    nobody = b.subscription_session(fs.new_id("cus"), str(uuid.uuid4()))
    answer = await b.ok(client, fs.event("checkout.session.completed", nobody))
    assert answer["status"] == "failed" and "names no tenant" in answer["error"]
    c = await b.linked_customer(client, auth)
    stolen = {**nobody, "customer": c.customer_id, "client_reference_id": str(user_id)}
    answer = await b.ok(client, fs.event("checkout.session.completed", stolen))
    assert answer["status"] == "failed" and "linked to another tenant" in answer["error"]
    bad_pack = fs.price("price_bad_pack", recurring=False, tollhouse_credits="-5")
    answer = await b.ok(client, fs.event("price.created", bad_pack))
    assert answer["status"] == "failed" and "positive integer" in answer["error"]


async def test_customer_events_link_by_metadata_and_keep_the_newest_details(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    user_id, tenant_id = await b.new_user(client, auth)
    cus = fs.shape("customer", id=fs.new_id("cus"), email="new@example.com", metadata={})
    assert (await b.ok(client, fs.event("customer.created", cus, created=5)))["status"] == (
        "parked"
    )
    linked = {**cus, "metadata": {"tollhouse_user_id": str(user_id)}, "email": "newer@example.com"}
    assert (await b.ok(client, fs.event("customer.updated", linked, created=10)))["status"] == (
        "processed"
    )
    # The parked older event was applied after the link, and did not overwrite the newer state.
    assert await rows(
        tollhouse, "SELECT tenant_id, email, deleted FROM tollhouse.billing_customers"
    ) == [(tenant_id, "newer@example.com", False)]
    await b.ok(client, fs.event("customer.deleted", linked, created=20))
    assert await rows(tollhouse, "SELECT deleted FROM tollhouse.billing_customers") == [(True,)]


async def test_products_and_prices_sync_newest_first(
    client: httpx.AsyncClient, tollhouse: Tollhouse
) -> None:
    product = fs.shape("product", id="prod_x", name="Pro", metadata={})
    await b.ok(client, fs.event("product.updated", {**product, "name": "Pro 2"}, created=20))
    await b.ok(client, fs.event("product.created", product, created=10))
    await b.ok(client, fs.event("product.deleted", product, created=30))
    assert await rows(tollhouse, "SELECT name, active FROM tollhouse.billing_products") == [
        ("Pro", False)
    ]
    newer = fs.price("price_x", tollhouse_plan="starter")
    await b.ok(client, fs.event("price.updated", newer, created=20))
    await b.ok(
        client, fs.event("price.created", fs.price("price_x", tollhouse_plan="pro"), created=10)
    )
    assert await rows(tollhouse, "SELECT plan FROM tollhouse.billing_prices") == [("starter",)]


async def test_end_users_read_only_their_own_billing_rows(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    await b.load_prices(client)
    mine = await b.linked_customer(client, auth)
    theirs = await b.linked_customer(client, auth)
    start, end = b.period()
    for c, sub_id in ((mine, "sub_mine"), (theirs, "sub_theirs")):
        sub = fs.subscription(sub_id, c.customer_id, b.PRICES[b.PRO], start=start, end=end)
        await b.ok(client, fs.event("customer.subscription.created", sub))
    async with tollhouse.db.as_end_user(mine.user_id) as conn:
        cur = await conn.execute("SELECT id FROM tollhouse.subscriptions")
        assert await cur.fetchall() == [("sub_mine",)]
        cur = await conn.execute("SELECT customer_id FROM tollhouse.billing_customers")
        assert await cur.fetchall() == [(mine.customer_id,)]
        cur = await conn.execute("SELECT count(*) FROM tollhouse.billing_events")
        row = await cur.fetchone()
        assert row is not None and row[0] >= 2  # its own checkout and subscription events
        cur = await conn.execute(
            "SELECT count(*) FROM tollhouse.billing_events WHERE tenant_id <> %s",
            (mine.tenant_id,),
        )
        assert await cur.fetchone() == (0,)
    with pytest.raises(TollhouseError) as denied:
        async with tollhouse.db.as_end_user(mine.user_id) as conn:
            await conn.execute("UPDATE tollhouse.subscriptions SET status = 'active'")
    assert denied.value.fields["sqlstate"] == "42501"


# --- found in review ---------------------------------------------------------------------------


async def _rows(tollhouse: Tollhouse, query: str, *params: object) -> list[tuple[Any, ...]]:
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def test_an_event_racing_the_link_is_applied_not_left_parked(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """The subscription event arrives while the checkout that links its customer is still
    in flight: it waits for the link (per-customer lock), then applies."""
    import asyncio
    import hashlib
    import json

    await b.load_prices(client)
    user_id, _ = await b.new_user(client, auth)
    customer = fs.new_id("cus")
    start, end = b.period()
    session = b.subscription_session(customer, str(user_id))
    checkout = fs.event("checkout.session.completed", session)
    sub = fs.event(
        "customer.subscription.created",
        fs.subscription(
            "sub_race_" + uuid.uuid4().hex[:6], customer, b.PRICES[b.PRO], start=start, end=end
        ),
    )
    body = json.dumps(checkout)
    incoming = Incoming(checkout, body, hashlib.sha256(body.encode()).hexdigest(), customer)
    async with tollhouse.db.connection() as conn, conn.transaction():
        await tollhouse.billing._store_and_apply(conn, incoming)
        racing = asyncio.create_task(b.ok(client, sub))
        await asyncio.sleep(0.3)
        assert not racing.done()  # it waits for the linking transaction
    assert (await racing)["status"] == "processed"
    user = (await client.get(f"/v1/users/{user_id}", headers=auth)).json()
    assert user["plan"] == "pro"


async def test_an_event_parked_while_the_link_is_made_is_applied_not_left_parked(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, dsn: str
) -> None:
    """The subscription event parks (its customer linked to no tenant) in a transaction
    that has not committed yet when the checkout that links the customer comes. Its
    application released the customer's lock with its subtransaction; migration 0021 takes
    it again to the commit, so the link waits, and its unparking then sees the event (it
    used to miss the uncommitted parked row and leave it parked)."""
    await b.load_prices(client)
    user_id, _ = await b.new_user(client, auth)
    customer = fs.new_id("cus")
    start, end = b.period()
    sub = fs.event(
        "customer.subscription.created",
        fs.subscription(fs.new_id("sub"), customer, b.PRICES[b.PRO], start=start, end=end),
    )
    session = b.subscription_session(customer, str(user_id))
    async with await psycopg.AsyncConnection.connect(dsn) as other:
        params = receive_params([Incoming.read(json.dumps(sub).encode())])
        cur = await other.execute(queries["receive"], {**params, "unpark": False})
        assert [r[2] for r in await cur.fetchall()] == ["parked"]  # not committed yet
        linking = asyncio.create_task(b.ok(client, fs.event("checkout.session.completed", session)))
        await _a_lock_wait(other, linking)
        await other.commit()
    assert (await linking)["status"] == "processed"
    assert (await tollhouse.billing.event(sub["id"])).status == "processed"
    user = (await client.get(f"/v1/users/{user_id}", headers=auth)).json()
    assert user["plan"] == "pro"


async def test_a_python_handled_event_parked_while_the_link_is_made_is_applied(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """The same race for an event a Python handler applies: a paid credit-pack Checkout
    naming only its customer parks in a transaction not committed yet when the checkout
    that links the customer comes; the link waits for it, then applies it."""
    await b.load_prices(client)
    user_id, _ = await b.new_user(client, auth)
    customer = fs.new_id("cus")
    pack = _unlinked_pack_session(customer)
    bought = fs.event("checkout.session.completed", pack)
    session = b.subscription_session(customer, str(user_id))
    async with tollhouse.db.connection() as conn, conn.transaction():
        incoming = Incoming.read(json.dumps(bought).encode())
        assert (await tollhouse.billing._store_and_apply(conn, incoming)).status == "parked"
        linking = asyncio.create_task(b.ok(client, fs.event("checkout.session.completed", session)))
        await _a_lock_wait(conn, linking)
    assert (await linking)["status"] == "processed"
    assert (await tollhouse.billing.event(bought["id"])).status == "processed"


async def test_an_event_parked_just_before_the_link_committed_is_applied_at_once(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The link commits between the parked application (whose savepoint's rollback released
    the customer's lock) and the taking of that lock again: the lock finds the link, and
    the event is applied in a second try instead of being stored parked."""
    await b.load_prices(client)
    _, tenant_id = await b.new_user(client, auth)
    customer = fs.new_id("cus")
    pack = _unlinked_pack_session(customer)
    billing = tollhouse.billing
    once = billing._apply_in_python_once
    tries: list[str] = []

    async def link_in_between(conn: Any, event: Any, at: Any) -> Any:
        outcome = await once(conn, event, at)
        tries.append(outcome[0])
        if len(tries) == 1:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
                await other.execute(
                    "SELECT tollhouse.billing_link_v1(%s, %s)", (customer, tenant_id)
                )
        return outcome

    before = (await tollhouse.credits.balance(tenant_id=tenant_id)).balance
    monkeypatch.setattr(billing, "_apply_in_python_once", link_in_between)
    answer = await b.ok(client, fs.event("checkout.session.completed", pack))
    assert tries == ["parked", "processed"]
    assert answer["status"] == "processed"
    assert (await tollhouse.credits.balance(tenant_id=tenant_id)).balance == before + 500


async def test_the_periods_allowance_is_paid_once_whatever_was_spent_first(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """Spending between the subscription's activation and its invoice, or between a lazy
    renewal and the renewal invoice: each period gives its 5,000 credits once in all."""
    import asyncio

    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    start, end = b.period()
    sub_id = "sub_once_" + uuid.uuid4().hex[:6]
    await b.ok(
        client,
        fs.event(
            "customer.subscription.updated",
            fs.subscription(sub_id, c.customer_id, b.PRICES[b.PRO], start=start, end=end),
            created=start,
        ),
    )
    debit = {"user_id": str(c.user_id), "amount": 900, "turn_id": uuid.uuid4().hex}
    assert (await client.post("/v1/credits/debit", json=debit, headers=auth)).status_code == 200
    await b.ok(
        client,
        fs.event(
            "invoice.paid",
            fs.invoice(
                "in_" + sub_id, c.customer_id, sub_id, b.PRICES[b.PRO], start=start, end=end
            ),
            created=start + 1,
        ),
    )
    balance = (await client.get(f"/v1/credits/balance?user_id={c.user_id}", headers=auth)).json()
    assert balance["balance"] == 5000 - 900

    # The period ends; the account renews lazily on the next debit; then the renewal invoice.
    await asyncio.sleep(1.1)
    renewal = int(time.time())
    for statement in (
        "UPDATE tollhouse.credit_accounts SET period_end = now() - interval '1 second',"
        " period_start = period_start - interval '1 month' WHERE tenant_id = %s",
        "UPDATE tollhouse.credit_grants SET expires_at = now() - interval '1 second'"
        " WHERE tenant_id = %s AND source = 'plan' AND remaining > 0",
    ):
        await tollhouse.db.transaction(
            lambda conn, statement=statement: conn.execute(statement, (c.tenant_id,))  # type: ignore[misc]
        )
    again = {**debit, "turn_id": uuid.uuid4().hex, "amount": 700}
    assert (await client.post("/v1/credits/debit", json=again, headers=auth)).status_code == 200
    renewed = fs.invoice(
        "in2_" + sub_id,
        c.customer_id,
        sub_id,
        b.PRICES[b.PRO],
        start=renewal,
        end=renewal + 30 * 86400,
    )
    await b.ok(client, fs.event("invoice.paid", renewed))
    balance = (await client.get(f"/v1/credits/balance?user_id={c.user_id}", headers=auth)).json()
    assert balance["balance"] == 5000 - 700
    assert (await tollhouse.health.doctor())[-1].ok


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
async def test_same_second_states_end_alike_in_either_order(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, order: tuple[int, int]
) -> None:
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    start, end = b.period()
    sub_id = "sub_tie_" + uuid.uuid4().hex[:6]
    second = int(time.time()) - 10
    states = [
        fs.event(
            kind,
            fs.subscription(
                sub_id, c.customer_id, b.PRICES[b.PRO], status=status, start=start, end=end
            ),
            created=second,
        )
        for kind, status in (
            ("customer.subscription.created", "incomplete"),
            ("customer.subscription.updated", "active"),
        )
    ]
    for index in order:
        await b.ok(client, states[index])
    rows = await _rows(
        tollhouse, "SELECT status FROM tollhouse.subscriptions WHERE id = %s", sub_id
    )
    assert rows == [("active",)]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
async def test_same_second_customers_products_prices_and_invoices_end_alike(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, order: tuple[int, int]
) -> None:
    """A `created` and an `updated` (an invoice's `finalized` and `paid`) of one second: the
    later kind of event wins in either arrival order (migration 0018)."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    second = int(time.time()) - 10
    price_id = "price_tie_" + uuid.uuid4().hex[:6]
    product_id = "prod_tie_" + uuid.uuid4().hex[:6]
    start, end = b.period()
    sub_id = "sub_tie_" + uuid.uuid4().hex[:6]
    await b.ok(
        client,
        fs.event(
            "customer.subscription.created",
            fs.subscription(sub_id, c.customer_id, b.PRICES[b.PRO], start=start, end=end),
            created=second - 5,
        ),
    )
    invoice = fs.invoice(
        "in_tie_" + uuid.uuid4().hex[:6],
        c.customer_id,
        sub_id,
        b.PRICES[b.PRO],
        start=start,
        end=end,
    )
    pairs = [
        (
            fs.event("price.created", fs.price(price_id), created=second),
            fs.event("price.updated", fs.price(price_id, tollhouse_plan="pro"), created=second),
        ),
        (
            fs.event(
                "product.created", fs.shape("product", id=product_id, name="Old"), created=second
            ),
            fs.event(
                "product.updated", fs.shape("product", id=product_id, name="New"), created=second
            ),
        ),
        (
            fs.event(
                "customer.created",
                fs.shape("customer", id=c.customer_id, email="old@example.com", metadata={}),
                created=second,
            ),
            fs.event(
                "customer.updated",
                fs.shape("customer", id=c.customer_id, email="new@example.com", metadata={}),
                created=second,
            ),
        ),
        (
            fs.event("invoice.finalized", {**invoice, "status": "open"}, created=second),
            fs.event("invoice.paid", invoice, created=second),
        ),
    ]
    for pair in pairs:
        for index in order:
            assert (await b.ok(client, pair[index]))["status"] == "processed"
    assert await _rows(
        tollhouse, "SELECT plan FROM tollhouse.billing_prices WHERE id = %s", price_id
    ) == [("pro",)]
    assert await _rows(
        tollhouse, "SELECT name FROM tollhouse.billing_products WHERE id = %s", product_id
    ) == [("New",)]
    assert await _rows(
        tollhouse,
        "SELECT email FROM tollhouse.billing_customers WHERE customer_id = %s",
        c.customer_id,
    ) == [("new@example.com",)]
    assert await _rows(
        tollhouse, "SELECT status, paid FROM tollhouse.invoices WHERE id = %s", invoice["id"]
    ) == [("paid", True)]


async def test_two_same_second_states_of_one_kind_end_alike_in_either_order(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """Two updates of one second cannot be told apart: the payloads' MD5 picks one, the same
    one in either arrival order (a price's, an invoice's)."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    start, end = b.period()
    price_id = "price_md5_" + uuid.uuid4().hex[:6]
    prices = [fs.price(price_id, tollhouse_plan=plan) for plan in ("pro", "starter")]
    invoice = fs.invoice(
        "in_md5_" + uuid.uuid4().hex[:6],
        c.customer_id,
        "sub_md5",
        b.PRICES[b.PRO],
        start=start,
        end=end,
    )
    invoices = [{**invoice, "status": "open", "amount_due": due} for due in (1000, 2000)]
    at = datetime.now(UTC).replace(microsecond=0)
    ends: list[tuple[Any, ...]] = []
    async with tollhouse.db.connection() as conn:
        for order in ((0, 1), (1, 0)):
            await conn.execute("BEGIN")
            for index in order:
                await conn.execute(
                    "SELECT tollhouse.billing_apply_price_v1('price.updated', %s, %s)",
                    (Jsonb(prices[index]), at),
                )
                await conn.execute(
                    "SELECT tollhouse.billing_apply_invoice_v1('invoice.updated', %s, %s)",
                    (Jsonb(invoices[index]), at),
                )
            cur = await conn.execute(
                "SELECT (SELECT plan FROM tollhouse.billing_prices WHERE id = %s),"
                " (SELECT raw_data ->> 'amount_due' FROM tollhouse.invoices WHERE id = %s)",
                (price_id, invoice["id"]),
            )
            ends.append(tuple(await cur.fetchone() or ()))
            await conn.execute("ROLLBACK")
    assert ends[0] == ends[1]
    assert ends[0][0] in ("pro", "starter") and ends[0][1] in ("1000", "2000")


async def test_an_older_deletion_of_a_customer_deletes_it_and_keeps_the_newer_fields(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    c = await b.linked_customer(client, auth)
    second = int(time.time()) - 10
    newer = fs.shape("customer", id=c.customer_id, email="newer@example.com", metadata={})
    older = fs.shape("customer", id=c.customer_id, email="older@example.com", metadata={})
    await b.ok(client, fs.event("customer.updated", newer, created=second))
    await b.ok(client, fs.event("customer.deleted", older, created=second - 5))
    assert await _rows(
        tollhouse,
        "SELECT email, deleted FROM tollhouse.billing_customers WHERE customer_id = %s",
        c.customer_id,
    ) == [("newer@example.com", True)]


async def test_events_failed_on_a_price_apply_once_the_price_sells_a_plan(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """A subscription to a price without tollhouse_plan fails; the operator adds the
    metadata and Stripe sends price.updated: the failed event is applied then, not left for
    a replay. So is a paid invoice (2025-03-31 shape: a price id only) that came before its
    price and its subscription."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    price_id, created = await b.failed_on_bare_price(client, c.customer_id)
    sub = created["data"]["object"]
    # The price stored, still selling nothing: nothing can heal, nothing is retried.
    await b.ok(client, fs.event("price.created", fs.price(price_id)))
    assert (await tollhouse.billing.event(created["id"])).attempts == 1
    fixed = await b.ok(client, fs.event("price.updated", fs.price(price_id, tollhouse_plan="pro")))
    assert fixed["status"] == "processed"
    stored = (await client.get(f"/v1/stripe/events/{created['id']}", headers=auth)).json()
    assert stored["status"] == "processed"
    billing = (await client.get(f"/v1/users/{c.user_id}/billing", headers=auth)).json()
    assert billing["plan"] == "pro" and billing["subscription"]["id"] == sub["id"]

    other = await b.linked_customer(client, auth)
    new_price = fs.new_id("price")
    start, end = b.period()
    invoice = b.priced_by_id(
        fs.invoice(
            fs.new_id("in"),
            other.customer_id,
            "sub_unseen",
            fs.price(new_price),
            start=start,
            end=end,
        )
    )
    paid = fs.event("invoice.paid", invoice)
    assert (await b.ok(client, paid))["status"] == "failed"
    await b.ok(client, fs.event("price.created", fs.price(new_price, tollhouse_plan="starter")))
    stored = (await client.get(f"/v1/stripe/events/{paid['id']}", headers=auth)).json()
    assert stored["status"] == "processed"
    billing = (await client.get(f"/v1/users/{other.user_id}/billing", headers=auth)).json()
    assert [i["id"] for i in billing["invoices"] if i["allowance_credits"]] == [invoice["id"]]


async def test_an_invoice_failed_before_its_subscription_applies_when_the_subscription_comes(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """Its plan cannot be told until the subscription is stored (the price is known only by
    id): it fails, and is applied when the subscription arrives, in a later delivery or in
    the same receive call, not left for a replay."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    invoice, paid, created = b.invoice_before_its_subscription(c.customer_id)
    failed = await b.ok(client, paid)
    assert failed["status"] == "failed" and failed["error"].startswith("unknown price ")
    assert (await b.ok(client, created))["status"] == "processed"
    assert (await tollhouse.billing.event(paid["id"])).status == "processed"
    billing = (await client.get(f"/v1/users/{c.user_id}/billing", headers=auth)).json()
    assert billing["plan"] == "starter"
    assert [i["id"] for i in billing["invoices"] if i["allowance_credits"]] == [invoice["id"]]

    other = await b.linked_customer(client, auth)
    invoice, paid, created = b.invoice_before_its_subscription(other.customer_id, "line")
    batch = [Incoming.read(json.dumps(event).encode()) for event in (paid, created)]
    delivered = await tollhouse.billing._receive(batch)
    assert [d.status for d in delivered] == ["failed", "processed"]  # as applied in the call
    assert (await tollhouse.billing.event(paid["id"])).status == "processed"
    billing = (await client.get(f"/v1/users/{other.user_id}/billing", headers=auth)).json()
    assert [i["id"] for i in billing["invoices"] if i["allowance_credits"]] == [invoice["id"]]

    # An invoice of a subscription never stored is not retried by another subscription of
    # its customer: it waits for its own.
    _, orphan_paid, _ = b.invoice_before_its_subscription(other.customer_id)
    assert (await b.ok(client, orphan_paid))["status"] == "failed"
    updated = fs.event("customer.subscription.updated", created["data"]["object"])
    assert (await b.ok(client, updated))["status"] == "processed"
    assert (await tollhouse.billing.event(orphan_paid["id"])).attempts == 1


async def test_a_parked_invoice_applies_after_its_parked_subscription_once_linked(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """Both parked (the customer is not linked yet), in one second, the invoice first by
    its id: when the link applies them, the invoice fails on its plan, then its subscription
    applies, and the invoice is applied again in the same transaction."""
    await b.load_prices(client)
    user_id, _ = await b.new_user(client, auth)
    customer_id = fs.new_id("cus")
    invoice, paid, created = b.invoice_before_its_subscription(customer_id, "line")
    second = int(time.time()) - 30
    paid = fs.event("invoice.paid", invoice, created=second, event_id="evt_a" + fs.new_id("x"))
    created = fs.event(
        "customer.subscription.created",
        created["data"]["object"],
        created=second,
        event_id="evt_b" + fs.new_id("x"),
    )
    assert (await b.ok(client, paid))["status"] == "parked"
    assert (await b.ok(client, created))["status"] == "parked"
    session = b.subscription_session(
        customer_id, str(user_id), payment_status="paid", status="complete"
    )
    assert (await b.ok(client, fs.event("checkout.session.completed", session)))["status"] == (
        "processed"
    )
    assert (await tollhouse.billing.event(created["id"])).status == "processed"
    assert (await tollhouse.billing.event(paid["id"])).status == "processed"
    billing = (await client.get(f"/v1/users/{user_id}/billing", headers=auth)).json()
    assert [i["id"] for i in billing["invoices"] if i["allowance_credits"]] == [invoice["id"]]


async def test_an_invoice_failure_committed_while_its_subscription_waits_is_seen(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, dsn: str
) -> None:
    """Another transaction (another process's call, or a Checkout unparking the invoice)
    failed the invoice and holds the customer's lock to its commit; the subscription's call
    has begun and waits for that lock. Its statement's snapshot is older than the failure,
    but the question whether invoices wait is asked with a snapshot of its own, after the
    wait: the invoice is applied once the subscription is."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    _, paid, created = b.invoice_before_its_subscription(c.customer_id)
    async with await psycopg.AsyncConnection.connect(dsn) as other:
        params = receive_params([Incoming.read(json.dumps(paid).encode())])
        cur = await other.execute(queries["receive"], {**params, "unpark": False})
        assert [(r[2], r[7]) for r in await cur.fetchall()] == [("failed", True)]
        # Not committed yet: the customer's lock is held.
        waiting = asyncio.create_task(
            tollhouse.billing._receive([Incoming.read(json.dumps(created).encode())])
        )
        assert await _a_lock_wait(other), "the subscription's call never waited for the lock"
        await other.commit()
        assert [d.status for d in await waiting] == ["processed"]
    assert (await tollhouse.billing.event(paid["id"])).status == "processed"


async def test_an_operators_retry_racing_the_subscription_still_applies_the_invoice(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator retries a failed invoice while its subscription is delivered: the
    subscription's call commits while the retry holds the invoice's row (its look for the
    waiting invoices skips that row), and the invoice fails again in the retry. The retry
    looks for the subscription after its commit and applies the invoice."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    invoice, paid, created = b.invoice_before_its_subscription(c.customer_id)
    assert (await b.ok(client, paid))["status"] == "failed"
    billing = tollhouse.billing
    process = billing._process
    delivered: list[str] = []

    async def subscription_meanwhile(conn: Any, event: Any, *, unpark: bool = True) -> Any:
        done = await process(conn, event, unpark=unpark)
        if event["id"] == paid["id"] and not delivered:
            assert done.status == "failed"  # not committed: this retry holds the row
            subscription = Incoming.read(json.dumps(created).encode())
            delivered.extend(d.status for d in await billing._receive([subscription]))
        return done

    monkeypatch.setattr(billing, "_process", subscription_meanwhile)
    retried = await billing.retry(paid["id"])
    assert delivered == ["processed"]
    assert retried.status == "failed"  # the retry itself, before its look
    assert (await billing.event(paid["id"])).status == "processed"
    answer = (await client.get(f"/v1/users/{c.user_id}/billing", headers=auth)).json()
    assert [i["id"] for i in answer["invoices"] if i["allowance_credits"]] == [invoice["id"]]


async def test_an_operators_retry_waits_for_the_subscription_sync_applies(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`stripe sync` applies the subscription while an operator's retry of the invoice
    holds its row: sync's look skips that row, and sync commits only after the retry's
    application failed. The retry keeps the customer's lock to its commit, so it commits
    after sync and its look then sees the subscription (it looked too early before)."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    _, paid, created = b.invoice_before_its_subscription(c.customer_id)
    assert (await b.ok(client, paid))["status"] == "failed"
    billing = tollhouse.billing
    process, unpark = billing._process, billing._unpark
    skipped, commit_sync = asyncio.Event(), asyncio.Event()
    syncing: list[asyncio.Task[None]] = []

    async def sync_unpark(conn: Any, customer_id: str | None) -> None:
        await unpark(conn, customer_id)
        if customer_id == c.customer_id and not skipped.is_set():
            skipped.set()  # sync looked while the retry held the invoice's row
            await commit_sync.wait()

    async def sync_meanwhile(conn: Any, event: Any, *, unpark: bool = True) -> Any:
        done = await process(conn, event, unpark=unpark)
        if event["id"] == paid["id"] and not syncing:
            obj = created["data"]["object"]
            at = datetime.now(UTC)
            syncing.append(asyncio.create_task(billing._apply_fetched(created["type"], obj, at)))
            await skipped.wait()
        return done

    monkeypatch.setattr(billing, "_unpark", sync_unpark)
    monkeypatch.setattr(billing, "_process", sync_meanwhile)
    retrying = asyncio.create_task(billing.retry(paid["id"]))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watch:
        await _a_lock_wait(watch, retrying)
    commit_sync.set()
    await syncing[0]
    assert (await retrying).status == "failed"  # the retry itself, before its look
    assert (await billing.event(paid["id"])).status == "processed"


async def test_a_price_is_answered_2xx_even_when_retrying_what_failed_on_it_fails(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    price_id, created = await b.failed_on_bare_price(client, c.customer_id)

    async def unavailable(event_id: str, **_: object) -> None:
        raise DatabaseUnavailable("the database went away")

    monkeypatch.setattr(tollhouse.billing, "retry", unavailable)
    price = fs.event("price.updated", fs.price(price_id, tollhouse_plan="pro"))
    assert (await b.ok(client, price))["status"] == "processed"
    stored = (await client.get(f"/v1/stripe/events/{created['id']}", headers=auth)).json()
    assert stored["status"] == "failed"  # left for a replay


async def test_an_unreadable_signed_object_is_failed_not_500(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    sub = fs.subscription(
        "sub_junk_" + uuid.uuid4().hex[:6], c.customer_id, b.PRICES[b.PRO], start=1, end=10**13
    )
    reply = await b.deliver(client, fs.event("customer.subscription.created", sub))
    assert reply.status_code == 200 and reply.json()["status"] == "failed", reply.text
    assert "unreadable" in reply.json()["error"]


async def test_a_refund_that_comes_before_its_purchase_still_takes_the_credits_back(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    await b.load_prices(client)
    user_id, _ = await b.new_user(client, auth)
    payment = fs.new_id("pi")
    session = fs.shape(
        "checkout.session",
        id=fs.new_id("cs_test"),
        mode="payment",
        customer=None,
        client_reference_id=str(user_id),
        payment_status="paid",
        amount_total=2000,
        payment_intent=payment,
        metadata={"tollhouse_price_id": b.PACK},
    )
    charge = fs.shape(
        "charge",
        id=fs.new_id("ch"),
        payment_intent=payment,
        amount=2000,
        amount_refunded=2000,
        refunded=True,
        customer=None,
    )
    assert (await b.ok(client, fs.event("charge.refunded", charge)))["status"] == "ignored"
    assert (await b.ok(client, fs.event("checkout.session.completed", session)))["status"] == (
        "processed"
    )
    rows = await _rows(
        tollhouse,
        "SELECT credits, refunded_amount FROM tollhouse.credit_pack_purchases"
        " WHERE payment_intent = %s",
        payment,
    )
    assert rows == [(500, 2000)]
    balance = (await client.get(f"/v1/credits/balance?user_id={user_id}", headers=auth)).json()
    assert balance["balance"] == 100  # the free allowance; the pack's 500 went back
