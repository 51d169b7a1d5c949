"""Calls to Stripe through a StripeClient pointed at the fake: Checkout and portal sessions
with idempotency keys, the lazy customer, and `sync` (W-12-like reconciliation)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import stripe

from tests.support import billing as b
from tests.support import fake_stripe as fs
from tollhouse.app import Tollhouse
from tollhouse.billing import BillingConfig, BillingService
from tollhouse.errors import StripeNotConfigured, WebhookNotConfigured


def _subscriber(
    tenant_id: uuid.UUID, plan: str, **customer_fields: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A customer of the tenant, a price of the plan, an active subscription to it and its
    paid invoice, for this period, as the fake Stripe holds them."""
    customer = fs.shape(
        "customer",
        id=fs.new_id("cus"),
        metadata={"tollhouse_tenant_id": str(tenant_id)},
        **customer_fields,
    )
    the_price = fs.price(f"price_{plan}_{uuid.uuid4().hex[:6]}", tollhouse_plan=plan)
    start, end = b.period()
    sub = fs.subscription(fs.new_id("sub"), customer["id"], the_price, start=start, end=end)
    inv = fs.invoice(fs.new_id("in"), customer["id"], sub["id"], the_price, start=start, end=end)
    return customer, the_price, sub, inv


async def test_checkout_creates_the_customer_once_and_answers_a_url(
    client: httpx.AsyncClient, auth: dict[str, str], stripe_api: fs.FakeStripe
) -> None:
    await b.load_prices(client)
    user_id, tenant_id = await b.new_user(client, auth)
    body = {
        "price_id": b.PRO,
        "success_url": "https://app.example/ok",
        "cancel_url": "https://app.example/cancel",
    }
    customers_before = len(stripe_api.objects["customers"])
    first = await client.post(f"/v1/users/{user_id}/checkout", json=body, headers=auth)
    assert first.status_code == 200, first.text
    assert first.json()["url"].startswith("https://checkout.stripe.test/")
    # A second purchase of the same price is a new session, not the first one replayed.
    again = await client.post(f"/v1/users/{user_id}/checkout", json=body, headers=auth)
    assert again.status_code == 200, again.text
    assert again.json()["url"] != first.json()["url"]
    # A caller's retry with its Idempotency-Key gets the same session; another key (or the
    # same key for another price) a new one.
    keyed = {**auth, "Idempotency-Key": "order-42"}
    retried = [
        (await client.post(f"/v1/users/{user_id}/checkout", json=body, headers=keyed)).json()
        for _ in range(2)
    ]
    assert retried[0] == retried[1]
    assert retried[0]["url"] not in (first.json()["url"], again.json()["url"])
    other = {**auth, "Idempotency-Key": "order-43"}
    assert (
        await client.post(f"/v1/users/{user_id}/checkout", json=body, headers=other)
    ).json() != retried[0]
    # Were Stripe to hold the key for other parameters, that is the caller's conflict (409),
    # not Stripe failing (502, which a client would retry forever).
    used = stripe_api.requests[-1][3]
    assert used is not None
    stripe_api.idempotency[used] = ("other parameters", *stripe_api.idempotency[used][1:])
    clash = await client.post(f"/v1/users/{user_id}/checkout", json=body, headers=other)
    assert (clash.status_code, clash.json()["error"]["code"]) == (409, "idempotency_conflict")
    for bad in ("", "a" * 256, "with space"):
        refused = await client.post(
            f"/v1/users/{user_id}/checkout", json=body, headers={**auth, "Idempotency-Key": bad}
        )
        assert refused.status_code == 422, (bad, refused.text)
    assert len(stripe_api.objects["customers"]) == customers_before + 1
    (customer,) = [
        c
        for c in stripe_api.objects["customers"].values()
        if c["metadata"].get("tollhouse_tenant_id") == str(tenant_id)
    ]
    sessions = [r for r in stripe_api.requests if r[1] == "/v1/checkout/sessions"]
    _method, _path, params, key = sessions[-1]
    assert key is not None and key.startswith("tollhouse-checkout-")
    assert params["customer"] == customer["id"]
    assert params["client_reference_id"] == str(tenant_id)
    assert params["mode"] == "subscription"
    assert params["metadata"]["tollhouse_price_id"] == b.PRO
    billing = (await client.get(f"/v1/users/{user_id}/billing", headers=auth)).json()
    assert billing["customer_id"] == customer["id"]

    portal = await client.post(
        f"/v1/users/{user_id}/portal", json={"return_url": "https://app.example"}, headers=auth
    )
    assert portal.status_code == 200 and portal.json()["url"].startswith("https://billing.")
    assert stripe_api.requests[-1][2]["customer"] == customer["id"]

    # The customer deleted at Stripe: the next checkout makes a new one, under a key of its
    # own (Stripe would replay the deleted customer for the first key).
    await b.ok(client, fs.event("customer.deleted", customer))
    after = await client.post(f"/v1/users/{user_id}/checkout", json=body, headers=auth)
    assert after.status_code == 200, after.text
    creations = [r for r in stripe_api.requests if r[:2] == ("POST", "/v1/customers")]
    assert [r[3] for r in creations] == [
        f"tollhouse-customer-{tenant_id}",
        f"tollhouse-customer-{tenant_id}-1",
    ]
    assert len(stripe_api.objects["customers"]) == customers_before + 2
    billing = (await client.get(f"/v1/users/{user_id}/billing", headers=auth)).json()
    assert billing["customer_id"] not in (None, customer["id"])


async def test_a_subscribed_tenant_changes_plan_in_the_portal_not_in_a_second_checkout(
    client: httpx.AsyncClient, auth: dict[str, str], stripe_api: fs.FakeStripe
) -> None:
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    start, end = b.period()
    sub = fs.subscription(fs.new_id("sub"), c.customer_id, b.PRICES[b.PRO], start=start, end=end)
    await b.ok(client, fs.event("customer.subscription.created", sub))
    urls = {"success_url": "https://app.example/ok", "cancel_url": "https://app.example/no"}
    path = f"/v1/users/{c.user_id}/checkout"
    sessions_before = stripe_api.created("/v1/checkout/sessions")
    for price in (b.STARTER, b.PRO):
        refused = await client.post(path, json={"price_id": price, **urls}, headers=auth)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "already_subscribed"
        assert sub["id"] in refused.json()["error"]["message"]
    assert stripe_api.created("/v1/checkout/sessions") == sessions_before
    # One-time purchases go on; so does a subscription once the current one is canceled.
    pack = await client.post(path, json={"price_id": b.PACK, **urls}, headers=auth)
    assert pack.status_code == 200, pack.text
    canceled = {**sub, "status": "canceled"}
    await b.ok(client, fs.event("customer.subscription.deleted", canceled))
    again = await client.post(path, json={"price_id": b.STARTER, **urls}, headers=auth)
    assert again.status_code == 200, again.text


async def test_the_customer_checkout_creates_applies_the_events_parked_for_it(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    stripe_api: fs.FakeStripe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event about the customer Stripe has just created for a checkout came before our
    link (and parked): the link made by the checkout applies it."""
    await b.load_prices(client)
    user_id, _ = await b.new_user(client, auth)
    customer = fs.new_id("cus")
    start, end = b.period()
    sub = fs.subscription(fs.new_id("sub"), customer, b.PRICES[b.PRO], start=start, end=end)
    created = fs.event("customer.subscription.created", sub)
    assert (await b.ok(client, created))["status"] == "parked"
    new_id = fs.new_id
    monkeypatch.setattr(
        fs, "new_id", lambda prefix: customer if prefix == "cus" else new_id(prefix)
    )
    body = {"price_id": b.PACK, "success_url": "https://a/x", "cancel_url": "https://a/y"}
    answer = await client.post(f"/v1/users/{user_id}/checkout", json=body, headers=auth)
    assert answer.status_code == 200, answer.text
    assert customer in stripe_api.objects["customers"]
    assert (await tollhouse.billing.event(created["id"])).status == "processed"
    billing = (await client.get(f"/v1/users/{user_id}/billing", headers=auth)).json()
    assert billing["customer_id"] == customer and billing["subscription"]["id"] == sub["id"]


async def test_checkout_refusals(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    await b.load_prices(client)
    user_id, tenant_id = await b.new_user(client, auth)
    body = {"price_id": "price_nope", "success_url": "https://a/x", "cancel_url": "https://a/y"}
    unknown = await client.post(f"/v1/users/{user_id}/checkout", json=body, headers=auth)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (422, "unknown_price")
    nobody = await client.post(f"/v1/users/{uuid.uuid4()}/checkout", json=body, headers=auth)
    assert (nobody.status_code, nobody.json()["error"]["code"]) == (404, "user_not_found")
    # Prices whose payment the handlers would not apply are not sold: a one-time price with
    # only a plan (no lifetime flag), a recurring one with only credits.
    for price in (
        fs.price("price_plan_once", recurring=False, tollhouse_plan="pro"),
        fs.price("price_credits_monthly", recurring=True, tollhouse_credits="300"),
    ):
        await b.ok(client, fs.event("price.created", price))
        unsold = await client.post(
            f"/v1/users/{user_id}/checkout", json={**body, "price_id": price["id"]}, headers=auth
        )
        assert (unsold.status_code, unsold.json()["error"]["code"]) == (422, "unknown_price")
    bad_url = {**body, "price_id": b.PRO, "success_url": "javascript:alert(1)"}
    invalid = await client.post(f"/v1/users/{user_id}/checkout", json=bad_url, headers=auth)
    assert invalid.status_code == 422
    no_key = await client.post(f"/v1/users/{user_id}/portal", headers={})
    assert no_key.status_code == 401
    unconfigured = BillingService(tollhouse.db, BillingConfig())
    with pytest.raises(StripeNotConfigured):
        await unconfigured.portal(tenant_id)


async def test_webhook_without_a_secret_is_503_and_stores_nothing(tollhouse: Tollhouse) -> None:
    unconfigured = BillingService(tollhouse.db, BillingConfig())
    with pytest.raises(WebhookNotConfigured):
        await unconfigured.receive(b"{}", "t=1,v1=00")
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM tollhouse.billing_events")
        assert await cur.fetchone() == (0,)


async def test_idempotency_key_reused_with_other_parameters_is_an_error(
    tollhouse: Tollhouse, stripe_api: fs.FakeStripe
) -> None:
    client = tollhouse.billing.client
    key: stripe.RequestOptions = {"idempotency_key": f"k-{uuid.uuid4()}"}
    first = client.v1.customers.create(params={"email": "a@example.com"}, options=key)
    again = client.v1.customers.create(params={"email": "a@example.com"}, options=key)
    assert first.id == again.id
    with pytest.raises(stripe.IdempotencyError, match="same parameters"):
        client.v1.customers.create(params={"email": "b@example.com"}, options=key)


async def test_sync_reconciles_what_never_arrived_and_later_deliveries_change_nothing(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    stripe_api: fs.FakeStripe,
) -> None:
    user_id, tenant_id = await b.new_user(client, auth)
    customer, the_price, sub, inv = _subscriber(tenant_id, "power", email="sync@example.com")
    for kind, obj in (
        ("customers", customer),
        ("prices", the_price),
        ("subscriptions", sub),
        ("invoices", inv),
    ):
        stripe_api.put(kind, obj)
    report = await tollhouse.billing.sync()
    assert report.failures == [], report.failures
    assert report.counts["subscriptions"] >= 1 and report.counts["invoices"] >= 1
    billing = (await client.get(f"/v1/users/{user_id}/billing", headers=auth)).json()
    assert billing["plan"] == "power" and billing["customer_id"] == customer["id"]
    assert billing["subscription"]["id"] == sub["id"]
    assert billing["invoices"][0]["allowance_credits"] == 20000

    # A late delivery of an older state of the same subscription changes nothing.
    stale = {**sub, "status": "past_due"}
    await b.ok(
        client, fs.event("customer.subscription.updated", stale, created=int(time.time()) - 60)
    )
    billing = (await client.get(f"/v1/users/{user_id}/billing", headers=auth)).json()
    assert billing["subscription"]["status"] == "active"
    # A second sync grants nothing more.
    await tollhouse.billing.sync()
    balance = (await client.get(f"/v1/credits/balance?user_id={user_id}", headers=auth)).json()
    assert balance["balance"] == 20000


async def test_sync_takes_canceled_subscriptions_and_since_skips_older_objects(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    stripe_api: fs.FakeStripe,
) -> None:
    """Sync asks for every subscription (`status=all`: Stripe leaves canceled ones out by
    default), and `since` asks only for objects created since then."""
    _, tenant_id = await b.new_user(client, auth)
    customer, the_price, sub, _ = _subscriber(tenant_id, "pro")
    ended = int(time.time()) - 3600
    canceled = {**sub, "status": "canceled", "canceled_at": ended, "ended_at": ended}
    _, other_tenant = await b.new_user(client, auth)
    old_customer, old_price, old_sub, _ = _subscriber(other_tenant, "power")
    for obj in (customer, the_price, canceled):
        obj["created"] = ended - 3600
    for obj in (old_customer, old_price, old_sub):
        obj["created"] = 1_600_000_000  # September 2020
    for kind, obj in (
        ("customers", customer),
        ("prices", the_price),
        ("subscriptions", canceled),
        ("customers", old_customer),
        ("prices", old_price),
        ("subscriptions", old_sub),
    ):
        stripe_api.put(kind, obj)
    report = await tollhouse.billing.sync(since=datetime.now(UTC) - timedelta(days=1))
    assert report.failures == [], report.failures
    query = "SELECT id, status FROM tollhouse.subscriptions WHERE id = ANY(%s)"
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(query, ([canceled["id"], old_sub["id"]],))
        assert await cur.fetchall() == [(canceled["id"], "canceled")]
    asked = [r[2] for r in stripe_api.requests if r[:2] == ("GET", "/v1/subscriptions")]
    assert asked and all(params.get("status") == "all" for params in asked)
    await tollhouse.billing.sync()  # without since: the older objects too
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(query, ([old_sub["id"]],))
        assert await cur.fetchall() == [(old_sub["id"], "active")]


async def test_sync_applies_what_failed_on_a_price_it_brings(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    stripe_api: fs.FakeStripe,
) -> None:
    """A subscription failed on a price without metadata; the price is fixed at Stripe and
    its event never arrives: `stripe sync` stores the price and applies the subscription."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    price_id, created = await b.failed_on_bare_price(client, c.customer_id)
    stripe_api.put("prices", fs.price(price_id, tollhouse_plan="pro"))
    report = await tollhouse.billing.sync()
    assert report.failures == [], report.failures
    assert (await tollhouse.billing.event(created["id"])).status == "processed"
    billing = (await client.get(f"/v1/users/{c.user_id}/billing", headers=auth)).json()
    assert billing["plan"] == "pro"


async def test_sync_applies_an_invoice_that_failed_before_the_subscription_it_brings(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    stripe_api: fs.FakeStripe,
) -> None:
    """A paid invoice naming only a price id unknown here failed: its subscription's events
    never arrived. `stripe sync` stores the subscription and applies the invoice's event."""
    await b.load_prices(client)
    c = await b.linked_customer(client, auth)
    invoice, paid, created = b.invoice_before_its_subscription(c.customer_id)
    assert (await b.ok(client, paid))["status"] == "failed"
    stripe_api.put("subscriptions", created["data"]["object"])
    report = await tollhouse.billing.sync()
    assert report.failures == [], report.failures
    assert (await tollhouse.billing.event(paid["id"])).status == "processed"
    billing = (await client.get(f"/v1/users/{c.user_id}/billing", headers=auth)).json()
    assert billing["plan"] == "starter"
    assert [i["id"] for i in billing["invoices"] if i["allowance_credits"]] == [invoice["id"]]


async def test_a_replayed_price_applies_what_failed_on_it(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """A price naming a plan not set up yet fails, and an invoice naming only that price
    fails after it. The operator sets up the plan and replays: the invoice, older, fails
    again first; the price then applies, and the invoice with it."""
    c = await b.linked_customer(client, auth)
    start, end = b.period()
    plan = "team_" + uuid.uuid4().hex[:6]
    price_id = "price_team_" + uuid.uuid4().hex[:6]
    invoice = b.priced_by_id(
        fs.invoice(
            fs.new_id("in"), c.customer_id, "sub_unseen", fs.price(price_id), start=start, end=end
        )
    )
    now = int(time.time())
    paid = fs.event("invoice.paid", invoice, created=now - 20)
    price = fs.event("price.created", fs.price(price_id, tollhouse_plan=plan), created=now - 10)
    assert (await b.ok(client, price))["status"] == "failed"
    assert (await b.ok(client, paid))["status"] == "failed"
    await tollhouse.credits.set_plan(plan, monthly_credits=3000, daily_cap=None, overdraft_limit=0)
    await tollhouse.billing.replay("failed")
    assert (await tollhouse.billing.event(price["id"])).status == "processed"
    assert (await tollhouse.billing.event(paid["id"])).status == "processed"


async def test_a_replayed_subscription_applies_the_invoice_that_failed_before_it(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """A subscription to a plan not set up yet fails, and a paid invoice naming only its
    price (never stored here) fails after it. The operator sets up the plan and replays: the
    invoice, older, fails again first; the subscription then applies, and the invoice with
    it."""
    c = await b.linked_customer(client, auth)
    plan = "team_" + uuid.uuid4().hex[:6]
    invoice, _, created = b.invoice_before_its_subscription(c.customer_id, plan=plan)
    now = int(time.time())
    paid = fs.event("invoice.paid", invoice, created=now - 20)
    created = fs.event("customer.subscription.created", created["data"]["object"], created=now - 10)
    assert (await b.ok(client, created))["status"] == "failed"
    assert (await b.ok(client, paid))["status"] == "failed"
    await tollhouse.credits.set_plan(plan, monthly_credits=3000, daily_cap=None, overdraft_limit=0)
    await tollhouse.billing.replay("failed")
    assert (await tollhouse.billing.event(created["id"])).status == "processed"
    assert (await tollhouse.billing.event(paid["id"])).status == "processed"


async def test_sync_never_overwrites_an_event_newer_than_its_page(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    stripe_api: fs.FakeStripe,
) -> None:
    """A webhook about a change made while sync's page was on its way (stamped this second)
    is newer than the page's state: sync keeps it."""
    _, tenant_id = await b.new_user(client, auth)
    customer, the_price, sub, _ = _subscriber(tenant_id, "pro")
    for kind, obj in (("customers", customer), ("prices", the_price), ("subscriptions", sub)):
        stripe_api.put(kind, obj)
    await tollhouse.billing.sync()
    # The page Stripe answers still says active; the webhook of this very second says past_due.
    await b.ok(
        client,
        fs.event(
            "customer.subscription.updated", {**sub, "status": "past_due"}, created=int(time.time())
        ),
    )
    await tollhouse.billing.sync()
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT status FROM tollhouse.subscriptions WHERE id = %s", (sub["id"],)
        )
        assert await cur.fetchone() == ("past_due",)


async def test_w12_events_that_never_arrived_are_ingested_and_later_deliveries_are_no_ops(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    stripe_api: fs.FakeStripe,
) -> None:
    """W-12: 50 events exist at Stripe but were never delivered. `sync` stores and applies
    all 50 (source `api`); delivering them afterwards is 50 duplicates with no effect and no
    conflict; a second sync finds them all known."""
    user_id, tenant_id = await b.new_user(client, auth)
    customer, the_price, sub, inv = _subscriber(tenant_id, "power")
    base = int(time.time()) - 3600
    events = [
        fs.event("price.created", the_price, created=base),
        fs.event("customer.created", customer, created=base + 1),
        fs.event("customer.subscription.created", sub, created=base + 2),
        fs.event("invoice.paid", inv, created=base + 3),
    ] + [
        fs.event("customer.updated", {**customer, "name": f"Name {n}"}, created=base + 4 + n)
        for n in range(46)
    ]
    for event in events:
        stripe_api.put("events", event)
    ids = [event["id"] for event in events]

    report = await tollhouse.billing.sync()
    assert report.failures == [], report.failures
    assert report.counts["events"] >= 50
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT source, status, count(*) FROM tollhouse.billing_events"
            " WHERE stripe_event_id = ANY(%s) GROUP BY 1, 2",
            (ids,),
        )
        assert await cur.fetchall() == [("api", "processed", 50)]
    billing = (await client.get(f"/v1/users/{user_id}/billing", headers=auth)).json()
    assert billing["plan"] == "power" and billing["subscription"]["id"] == sub["id"]
    balance = (await client.get(f"/v1/credits/balance?user_id={user_id}", headers=auth)).json()
    assert balance["balance"] == 20000

    answers = [await b.ok(client, event) for event in events]
    assert {answer["status"] for answer in answers} == {"duplicate"}
    again = await tollhouse.billing.sync()
    assert again.counts["events_known"] >= 50 and again.failures == []
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM tollhouse.billing_event_conflicts"
            " WHERE stripe_event_id = ANY(%s)",
            (ids,),
        )
        assert await cur.fetchone() == (0,)
    after = (await client.get(f"/v1/credits/balance?user_id={user_id}", headers=auth)).json()
    assert after["balance"] == 20000


async def test_sync_reports_an_event_holding_half_a_surrogate_pair_and_goes_on(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    stripe_api: fs.FakeStripe,
) -> None:
    """An event of Stripe's API that PostgreSQL cannot store (a lone UTF-16 surrogate, which
    JSON allows) is one failure of the sync, as its delivery would be a 400; the others are
    ingested."""
    _, tenant_id = await b.new_user(client, auth)
    customer, *_ = _subscriber(tenant_id, "pro")
    at = int(time.time()) - 60
    bad = fs.event("customer.updated", {**customer, "name": "half \ud800"}, created=at)
    good = fs.event("customer.updated", {**customer, "name": "whole"}, created=at + 1)
    for event in (bad, good):
        stripe_api.put("events", event)
    try:
        report = await tollhouse.billing.sync()
    finally:
        del stripe_api.objects["events"][bad["id"]]  # the fake serves every test
    assert [(f["kind"], f["id"]) for f in report.failures] == [("events", bad["id"])]
    assert "surrogate" in report.failures[0]["error"]
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT stripe_event_id FROM tollhouse.billing_events WHERE stripe_event_id = ANY(%s)",
            ([bad["id"], good["id"]],),
        )
        assert await cur.fetchall() == [(good["id"],)]


async def test_an_api_copy_of_an_event_delivered_before_is_known_not_a_conflict(
    client: httpx.AsyncClient, tollhouse: Tollhouse
) -> None:
    event = fs.event("foo.bar", {"id": "x"})
    assert (await b.ok(client, event))["status"] == "ignored"
    assert (await tollhouse.billing.ingest(event)).status == "duplicate"
    # The same on the Python handlers' path (Checkout Sessions, refunds).
    checkout = fs.event(
        "checkout.session.completed", b.subscription_session("cus_api_copy", "nobody")
    )
    await b.ok(client, checkout)
    assert (await tollhouse.billing.ingest(checkout)).status == "duplicate"
