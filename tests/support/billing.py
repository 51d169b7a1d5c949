"""Helpers for billing tests: signed deliveries, and a user linked to a Stripe customer."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests.support import fake_stripe as fs

PRO = "price_pro_monthly"
STARTER = "price_starter_monthly"
PACK = "price_pack_500"
LIFETIME = "price_lifetime_power"

PRICES = {
    PRO: fs.price(PRO, tollhouse_plan="pro"),
    STARTER: fs.price(STARTER, tollhouse_plan="starter"),
    PACK: fs.price(PACK, recurring=False, tollhouse_credits="500"),
    LIFETIME: fs.price(
        LIFETIME, recurring=False, tollhouse_plan="power", tollhouse_lifetime="true"
    ),
}


async def deliver(
    client: httpx.AsyncClient,
    event: dict[str, Any],
    *,
    secret: str = fs.SECRET,
    timestamp: int | None = None,
) -> httpx.Response:
    body = json.dumps(event)
    return await client.post(
        "/v1/stripe/webhook", content=body, headers=fs.sign(body, secret, timestamp)
    )


async def ok(client: httpx.AsyncClient, event: dict[str, Any]) -> dict[str, Any]:
    """Deliver and insist on a 2xx; the delivery's answer."""
    response = await deliver(client, event)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def load_prices(client: httpx.AsyncClient) -> None:
    for the_price in PRICES.values():
        assert (await ok(client, fs.event("price.created", the_price, created=1)))["status"] == (
            "processed"
        )


@dataclass
class Customer:
    user_id: uuid.UUID
    tenant_id: uuid.UUID
    customer_id: str


async def new_user(client: httpx.AsyncClient, auth: dict[str, str]) -> tuple[uuid.UUID, uuid.UUID]:
    response = await client.post(
        "/v1/users", json={"email": f"{uuid.uuid4().hex[:12]}@example.com"}, headers=auth
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return uuid.UUID(body["id"]), uuid.UUID(body["personal_tenant_id"])


def subscription_session(customer_id: str, reference: str, **fields: Any) -> dict[str, Any]:
    """A completed subscription-mode Checkout Session naming `reference` (a user or tenant)."""
    return fs.shape(
        "checkout.session",
        id=fs.new_id("cs_test"),
        mode="subscription",
        customer=customer_id,
        client_reference_id=reference,
        metadata={},
        **fields,
    )


async def linked_customer(client: httpx.AsyncClient, auth: dict[str, str]) -> Customer:
    """A new user whose Stripe customer a completed subscription Checkout linked."""
    user_id, tenant_id = await new_user(client, auth)
    customer_id = fs.new_id("cus")
    session = subscription_session(
        customer_id, str(user_id), payment_status="paid", status="complete"
    )
    answer = await ok(client, fs.event("checkout.session.completed", session))
    assert answer["status"] == "processed", answer
    return Customer(user_id, tenant_id, customer_id)


def period(days: int = 30) -> tuple[int, int]:
    now = int(time.time())
    return now - 60, now + days * 86400


def priced_by_id(invoice: dict[str, Any]) -> dict[str, Any]:
    """The invoice in the 2025-03-31 shape: its line names its price by id only."""
    line = invoice["lines"]["data"][0]
    price_id = line["price"]["id"]
    line["price"] = None
    line["pricing"] = {"type": "price_details", "price_details": {"price": price_id}}
    return invoice


def invoice_before_its_subscription(
    customer_id: str, names_it: str = "parent", plan: str = "starter"
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A paid invoice in the 2025-03-31 shape naming a price never stored here, and the
    created event of its subscription, whose price (embedded) sells `plan`. The invoice
    names its subscription where `names_it` says: in its `parent` only (as Stripe's
    2025-03-31 invoices do), or in its `line` only (older ones)."""
    start, end = period()
    price = fs.price(fs.new_id("price"), tollhouse_plan=plan)
    sub = fs.subscription(fs.new_id("sub"), customer_id, price, start=start, end=end)
    invoice = priced_by_id(
        fs.invoice(fs.new_id("in"), customer_id, sub["id"], price, start=start, end=end)
    )
    if names_it == "parent":
        del invoice["lines"]["data"][0]["subscription"]
    else:
        invoice["parent"] = None
    return (
        invoice,
        fs.event("invoice.paid", invoice),
        fs.event("customer.subscription.created", sub),
    )


async def failed_on_bare_price(
    client: httpx.AsyncClient, customer_id: str
) -> tuple[str, dict[str, Any]]:
    """A new price without tollhouse_* metadata and a subscription to it, delivered: the
    event fails on the price. Its price id and the event."""
    start, end = period()
    price_id = fs.new_id("price")
    sub = fs.subscription(fs.new_id("sub"), customer_id, fs.price(price_id), start=start, end=end)
    event = fs.event("customer.subscription.created", sub)
    answer = await ok(client, event)
    assert answer["status"] == "failed" and f"unknown price {price_id}:" in answer["error"]
    return price_id, event
