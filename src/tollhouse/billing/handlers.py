"""Applying one Stripe event (or one fetched object) to the database, inside the caller's
transaction. Every write is an upsert that keeps the newer Stripe state, or a call of a
billing function that grants once; so applying an event twice, or events in any order,
ends in the same state.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from tollhouse.billing.objects import (
    Obj,
    Parked,
    PriceTerms,
    Problem,
    as_uuid,
    invoice_line,
    invoice_period,
    invoice_subscription,
    line_price,
    metadata,
    price_terms,
    ref,
    subscription_item,
    subscription_period,
    ts,
)
from tollhouse.db.pool import Conn
from tollhouse.db.queries import Queries

queries = Queries("tollhouse.billing", "queries.sql")

#: Fetches a Checkout Session's line items when the session does not name its price.
LineItems = Callable[[str], Awaitable[list[Obj]]]


@dataclass(frozen=True)
class Applied:
    """The outcome of one event: `processed` or `ignored`, and the tenant it concerned."""

    status: str
    tenant_id: uuid.UUID | None = None
    customer_id: str | None = None


@dataclass(frozen=True)
class Context:
    conn: Conn
    type: str
    obj: Obj
    at: datetime
    line_items: LineItems | None = None


async def _one(conn: Conn, query: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    cur = await conn.execute(queries[query], params)
    return await cur.fetchone()


async def _lock_customer(conn: Conn, customer_id: str) -> None:
    """Serialize, per Stripe customer, every transaction that reads or makes its link. An
    event that finds no link then parks only once the linking transaction is out of the way
    (before it: the link's unparking sees it; after it: the event sees the link), so no
    event stays parked because the two ran side by side under READ COMMITTED."""
    await conn.execute(queries["lock_customer"], {"customer_id": customer_id})


async def route(conn: Conn, customer_id: str | None) -> uuid.UUID | None:
    if customer_id is None:
        return None
    await _lock_customer(conn, customer_id)
    row = await _one(conn, "route", {"customer_id": customer_id})
    return row[0] if row else None


async def tenant_for(conn: Conn, customer_id: str | None) -> uuid.UUID:
    """The customer's tenant, or `Parked` (no user is ever created from a webhook)."""
    if customer_id is None:
        raise Problem("the object names no customer")
    tenant = await route(conn, customer_id)
    if tenant is None:
        raise Parked(customer_id)
    return tenant


async def link(conn: Conn, customer_id: str, tenant: uuid.UUID) -> bool:
    """Link a customer to a tenant; True when this call made the link. A customer linked to
    another tenant is a problem, never re-pointed."""
    await _lock_customer(conn, customer_id)
    row = await _one(conn, "link_customer", {"customer_id": customer_id, "tenant_id": tenant})
    if row is not None:
        return True
    current = await route(conn, customer_id)
    if current != tenant:
        raise Problem(f"customer {customer_id} is linked to another tenant")
    return False


async def sync_plan(conn: Conn, tenant: uuid.UUID) -> None:
    """Move the tenant's credits to its effective plan (a no-op when unchanged)."""
    await conn.execute(queries["sync_plan"], {"tenant_id": tenant})


async def known_plan(conn: Conn, plan: str | None, what: str) -> str | None:
    if plan is not None and await _one(conn, "plan_exists", {"plan": plan}) is None:
        raise Problem(f"{what} names the unknown plan {plan!r}")
    return plan


async def resolve_price(conn: Conn, price: Obj | str | None) -> tuple[str | None, PriceTerms]:
    """A price's id and terms: from the object's own metadata, else from the synced prices."""
    if isinstance(price, dict):
        terms = price_terms(price)
        if terms.sells_something:
            return ref(price), terms
        price = ref(price)
    if price is None:
        return None, PriceTerms(None, None, False)
    row = await _one(conn, "price", {"id": price})
    if row is None:
        return price, PriceTerms(None, None, False)
    return price, PriceTerms(row[1], row[2], bool(row[3]))


# --- customers ------------------------------------------------------------------------------


async def customer(ctx: Context) -> Applied:
    customer_id = ref(ctx.obj)
    if customer_id is None:
        raise Problem("the customer has no id")
    meta = metadata(ctx.obj)
    tenant = await route(ctx.conn, customer_id)
    if tenant is None:
        named = await reference_tenant(
            ctx.conn, meta.get("tollhouse_tenant_id") or meta.get("tollhouse_user_id")
        )
        if named is None:
            raise Parked(customer_id)
        await link(ctx.conn, customer_id, named)
        tenant = named
    await ctx.conn.execute(
        queries["upsert_customer"],
        {
            "tenant_id": tenant,
            "customer_id": customer_id,
            "email": ctx.obj.get("email"),
            "name": ctx.obj.get("name"),
            "deleted": ctx.type == "customer.deleted" or bool(ctx.obj.get("deleted")),
            "at": ctx.at,
            "raw": Jsonb(ctx.obj),
        },
    )
    return Applied("processed", tenant, customer_id)


async def reference_tenant(conn: Conn, reference: str | None) -> uuid.UUID | None:
    """The tenant a Checkout reference names: a tenant id, or a user's personal tenant."""
    ref_id = as_uuid(reference)
    if ref_id is None:
        return None
    row = await _one(conn, "tenant_of_reference", {"ref": ref_id})
    return row[0] if row else None


# --- products and prices --------------------------------------------------------------------


async def product(ctx: Context) -> Applied:
    await ctx.conn.execute(
        queries["upsert_product"],
        {
            "id": ref(ctx.obj),
            "name": ctx.obj.get("name"),
            "active": bool(ctx.obj.get("active", True)) and ctx.type != "product.deleted",
            "metadata": Jsonb(metadata(ctx.obj)),
            "at": ctx.at,
            "raw": Jsonb(ctx.obj),
        },
    )
    return Applied("processed")


async def price(ctx: Context) -> Applied:
    terms = price_terms(ctx.obj)
    await known_plan(ctx.conn, terms.plan, f"price {ref(ctx.obj)}")
    recurring = ctx.obj.get("recurring") or {}
    await ctx.conn.execute(
        queries["upsert_price"],
        {
            "id": ref(ctx.obj),
            "product_id": ref(ctx.obj.get("product")),
            "active": bool(ctx.obj.get("active", True)) and ctx.type != "price.deleted",
            "type": ctx.obj.get("type"),
            "currency": ctx.obj.get("currency"),
            "unit_amount": ctx.obj.get("unit_amount"),
            "interval": recurring.get("interval"),
            "plan": terms.plan,
            "credits": terms.credits,
            "lifetime": terms.lifetime,
            "metadata": Jsonb(metadata(ctx.obj)),
            "at": ctx.at,
            "raw": Jsonb(ctx.obj),
        },
    )
    return Applied("processed")


# --- subscriptions --------------------------------------------------------------------------


async def subscription(ctx: Context) -> Applied:
    customer_id = ref(ctx.obj.get("customer"))
    tenant = await tenant_for(ctx.conn, customer_id)
    item = subscription_item(ctx.obj)
    price_id, terms = await resolve_price(ctx.conn, item.get("price"))
    if price_id is None or terms.plan is None:
        raise Problem(f"unknown price {price_id}: no tollhouse_plan in its metadata")
    await known_plan(ctx.conn, terms.plan, f"price {price_id}")
    start, end = subscription_period(ctx.obj)
    price_obj: Obj = item["price"] if isinstance(item.get("price"), dict) else {}
    status = "canceled" if ctx.type == "customer.subscription.deleted" else ctx.obj.get("status")
    await ctx.conn.execute(
        queries["upsert_subscription"],
        {
            "tenant_id": tenant,
            "id": ref(ctx.obj),
            "customer_id": customer_id,
            "status": status,
            "plan": terms.plan,
            "price_id": price_id,
            "amount": price_obj.get("unit_amount"),
            "currency": ctx.obj.get("currency"),
            "period_start": start,
            "period_end": end,
            "trial_end": ts(ctx.obj.get("trial_end")),
            "cancel_at_period_end": bool(ctx.obj.get("cancel_at_period_end")),
            "canceled_at": ts(ctx.obj.get("canceled_at")),
            "ended_at": ts(ctx.obj.get("ended_at")),
            "metadata": Jsonb(metadata(ctx.obj)),
            "raw": Jsonb(ctx.obj),
            "at": ctx.at,
        },
    )
    await sync_plan(ctx.conn, tenant)
    return Applied("processed", tenant, customer_id)


# --- invoices -------------------------------------------------------------------------------


async def invoice(ctx: Context) -> Applied:
    customer_id = ref(ctx.obj.get("customer"))
    tenant = await tenant_for(ctx.conn, customer_id)
    subscription_id = invoice_subscription(ctx.obj) or ref(
        invoice_line(ctx.obj).get("subscription")
    )
    price_id, terms = await resolve_price(ctx.conn, line_price(invoice_line(ctx.obj)))
    plan = terms.plan
    if plan is None and subscription_id is not None:
        row = await _one(
            ctx.conn, "subscription_plan", {"tenant_id": tenant, "id": subscription_id}
        )
        plan = row[0] if row else None
    paid = (
        ctx.type in ("invoice.paid", "invoice.payment_succeeded") or ctx.obj.get("status") == "paid"
    )
    if paid and subscription_id is not None and plan is None:
        raise Problem(f"unknown price {price_id}: the invoice's plan cannot be told")
    await known_plan(ctx.conn, plan, f"invoice {ref(ctx.obj)}")
    start, end = invoice_period(ctx.obj)
    await ctx.conn.execute(
        queries["upsert_invoice"],
        {
            "tenant_id": tenant,
            "id": ref(ctx.obj),
            "customer_id": customer_id,
            "subscription_id": subscription_id,
            "status": ctx.obj.get("status"),
            "plan": plan,
            "amount_due": ctx.obj.get("amount_due"),
            "amount_paid": ctx.obj.get("amount_paid"),
            "currency": ctx.obj.get("currency"),
            "period_start": start,
            "period_end": end,
            "paid": paid,
            "payment_failed": ctx.type == "invoice.payment_failed",
            "url": ctx.obj.get("hosted_invoice_url"),
            "raw": Jsonb(ctx.obj),
            "at": ctx.at,
        },
    )
    if paid and subscription_id is not None:
        await ctx.conn.execute(
            queries["invoice_allowance"], {"tenant_id": tenant, "id": ref(ctx.obj)}
        )
        await sync_plan(ctx.conn, tenant)
    return Applied("processed", tenant, customer_id)


# --- checkout and refunds -------------------------------------------------------------------


async def checkout_completed(ctx: Context) -> Applied:
    session_id = ref(ctx.obj)
    meta = metadata(ctx.obj)
    customer_id = ref(ctx.obj.get("customer"))
    reference = (
        ctx.obj.get("client_reference_id")
        or meta.get("tollhouse_tenant_id")
        or meta.get("tollhouse_user_id")
    )
    tenant = await reference_tenant(ctx.conn, reference)
    if tenant is None and customer_id is not None:
        tenant = await route(ctx.conn, customer_id)
    if tenant is None:
        if reference:
            raise Problem(f"client_reference_id {reference!r} names no tenant or user")
        if customer_id is None:
            raise Problem("the session names neither a client_reference_id nor a customer")
        raise Parked(customer_id)
    if customer_id is not None:
        await link(ctx.conn, customer_id, tenant)
    if ctx.obj.get("mode") == "payment":
        if ctx.obj.get("payment_status") not in ("paid", "no_payment_required"):
            return Applied("processed", tenant, customer_id)  # async payment: its own event
        await _purchase(ctx, tenant, session_id or "")
    return Applied("processed", tenant, customer_id)


async def _purchase(ctx: Context, tenant: uuid.UUID, session_id: str) -> None:
    price_ref: Obj | str | None = metadata(ctx.obj).get("tollhouse_price_id")
    if price_ref is None and ctx.line_items is not None:
        items = await ctx.line_items(session_id)
        price_ref = items[0].get("price") if items else None
    price_id, terms = await resolve_price(ctx.conn, price_ref)
    if price_id is None:
        raise Problem("the session's price cannot be told (no tollhouse_price_id metadata)")
    params = {
        "tenant_id": tenant,
        "payment_intent": ref(ctx.obj.get("payment_intent")),
        "amount": ctx.obj.get("amount_total"),
        "price_id": price_id,
    }
    if terms.lifetime and terms.plan is not None:
        await known_plan(ctx.conn, terms.plan, f"price {price_id}")
        await ctx.conn.execute(
            queries["lifetime_purchase"],
            {**params, "id": session_id, "plan": terms.plan, "currency": ctx.obj.get("currency")},
        )
        await sync_plan(ctx.conn, tenant)
    elif terms.credits is not None:
        await ctx.conn.execute(
            queries["credit_pack"], {**params, "session": session_id, "credits": terms.credits}
        )
    else:
        raise Problem(f"unknown price {price_id}: neither a credit pack nor a lifetime deal")
    await _refund_earlier(ctx.conn, ref(ctx.obj.get("payment_intent")))


async def charge_refunded(ctx: Context) -> Applied:
    if ref(ctx.obj.get("payment_intent")) is None:
        return Applied("ignored")
    tenant = await _refund(ctx.conn, ctx.obj)
    if tenant is None:
        # Before its purchase: the event stays stored, and the purchase applies it (below).
        return Applied("ignored")
    return Applied("processed", tenant, ref(ctx.obj.get("customer")))


async def _refund(conn: Conn, charge: Obj) -> uuid.UUID | None:
    """Apply a charge's refunded total to the purchases it paid for; their tenant, or None
    when no purchase of that payment is known (yet). Idempotent: the total, not a delta."""
    payment_intent = ref(charge.get("payment_intent"))
    refunded = int(charge.get("amount_refunded") or 0)
    cur = await conn.execute(queries["purchases_by_payment"], {"payment_intent": payment_intent})
    tenant: uuid.UUID | None = None
    for kind, tenant, purchase_id, amount in await cur.fetchall():
        if kind == "pack":
            await conn.execute(
                queries["refund_pack"],
                {"tenant_id": tenant, "id": purchase_id, "refunded": refunded},
            )
        elif amount is None or refunded >= amount or charge.get("refunded"):
            await conn.execute(queries["refund_lifetime"], {"tenant_id": tenant, "id": purchase_id})
            await sync_plan(conn, tenant)
    return tenant


async def _refund_earlier(conn: Conn, payment_intent: str | None) -> None:
    """A refund Stripe delivered before the purchase it refunds, applied now."""
    if payment_intent is None:
        return
    cur = await conn.execute(queries["earlier_refund"], {"payment_intent": payment_intent})
    row = await cur.fetchone()
    if row is not None:
        await _refund(conn, row[0])


Handler = Callable[[Context], Awaitable[Applied]]

HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": checkout_completed,
    "checkout.session.async_payment_succeeded": checkout_completed,
    "customer.created": customer,
    "customer.updated": customer,
    "customer.deleted": customer,
    "customer.subscription.created": subscription,
    "customer.subscription.updated": subscription,
    "customer.subscription.deleted": subscription,
    "customer.subscription.trial_will_end": subscription,
    "customer.subscription.paused": subscription,
    "customer.subscription.resumed": subscription,
    "invoice.created": invoice,
    "invoice.finalized": invoice,
    "invoice.updated": invoice,
    "invoice.paid": invoice,
    "invoice.payment_succeeded": invoice,
    "invoice.payment_failed": invoice,
    "invoice.voided": invoice,
    "invoice.marked_uncollectible": invoice,
    "price.created": price,
    "price.updated": price,
    "price.deleted": price,
    "product.created": product,
    "product.updated": product,
    "product.deleted": product,
    "charge.refunded": charge_refunded,
}


def event_customer(event: Obj) -> str | None:
    """The customer an event concerns, stored with it so a parked event can be found."""
    obj = (event.get("data") or {}).get("object") or {}
    if str(event.get("type", "")).startswith("customer.") and obj.get("object") == "customer":
        return ref(obj)
    return ref(obj.get("customer"))


async def apply(
    conn: Conn, type_: str, obj: Obj, at: datetime, line_items: LineItems | None = None
) -> Applied:
    """Apply one object under an event type; unknown types are `ignored`."""
    handler = HANDLERS.get(type_)
    if handler is None:
        return Applied("ignored")
    return await handler(Context(conn, type_, obj, at, line_items))
