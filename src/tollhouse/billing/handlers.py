"""Applying one Stripe event (or one fetched object) to the database, inside the caller's
transaction. Every write is an upsert that keeps the newer Stripe state, or a call of a
billing function that grants once; so applying an event twice, or events in any order,
ends in the same state.

The frequent events (customers, products, prices, subscriptions, invoices) are applied by
`billing_apply_v1` (migration 0009) in one call; this module applies the Checkout Sessions
(which may need the Stripe API) and the refunds, and shares the routing, linking, price and
plan rules with those functions by calling them.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tollhouse.billing.objects import Obj, Parked, PriceTerms, Problem, metadata, ref
from tollhouse.db.pool import Conn
from tollhouse.db.queries import Queries

queries = Queries("tollhouse.billing", "queries.sql")

#: Fetches a Checkout Session's line items when the session does not name its price.
LineItems = Callable[[str], Awaitable[list[Obj]]]

#: SQLSTATEs the billing functions raise: a business problem, a customer of no tenant.
PROBLEM, PARKED = "TB001", "TB002"


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
    """One row of a named query; the billing functions' TB001 / TB002 come out as
    `Problem` / `Parked`."""
    try:
        cur = await conn.execute(queries[query], params)
        return await cur.fetchone()
    except psycopg.Error as exc:
        if exc.sqlstate == PROBLEM:
            raise Problem(exc.diag.message_primary or "") from exc
        if exc.sqlstate == PARKED:
            raise Parked(exc.diag.message_detail or "") from exc
        raise


async def route(conn: Conn, customer_id: str | None) -> uuid.UUID | None:
    """The customer's tenant, after taking the customer's lock (`billing_route_v1`)."""
    row = await _one(conn, "route", {"customer_id": customer_id})
    return row[0] if row else None


async def link(conn: Conn, customer_id: str, tenant: uuid.UUID) -> bool:
    """Link a customer to a tenant; True when this call made the link. A customer linked to
    another tenant is a problem, never re-pointed."""
    row = await _one(conn, "link_customer", {"customer_id": customer_id, "tenant_id": tenant})
    return bool(row and row[0])


async def sync_plan(conn: Conn, tenant: uuid.UUID) -> None:
    """Move the tenant's credits to its effective plan (a no-op when unchanged)."""
    await conn.execute(queries["sync_plan"], {"tenant_id": tenant})


async def known_plan(conn: Conn, plan: str | None, what: str) -> str | None:
    await _one(conn, "known_plan", {"plan": plan, "what": what})
    return plan


async def resolve_price(conn: Conn, price: Obj | str | None) -> tuple[str | None, PriceTerms]:
    """A price's id and terms: from the object's own metadata, else from the synced prices."""
    row = await _one(conn, "resolve_price", {"price": Jsonb(price)})
    assert row is not None
    return row[0], PriceTerms(row[1], row[2], bool(row[3]))


async def reference_tenant(conn: Conn, reference: str | None) -> uuid.UUID | None:
    """The tenant a Checkout reference names: a tenant id, or a user's personal tenant."""
    row = await _one(conn, "tenant_of_reference", {"ref": reference})
    return row[0] if row else None


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
    payment_intent = ref(ctx.obj.get("payment_intent"))
    params = {
        "tenant_id": tenant,
        "payment_intent": payment_intent,
        "amount": ctx.obj.get("amount_total"),
        "price_id": price_id,
    }
    await _lock_payment(ctx.conn, payment_intent)
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
    await _refund_earlier(ctx.conn, payment_intent)


async def charge_refunded(ctx: Context) -> Applied:
    payment_intent = ref(ctx.obj.get("payment_intent"))
    if payment_intent is None:
        return Applied("ignored")
    await _lock_payment(ctx.conn, payment_intent)
    tenant = await _refund(ctx.conn, ctx.obj)
    if tenant is None:
        # Before its purchase: the event stays stored, and the purchase applies it (below).
        return Applied("ignored")
    return Applied("processed", tenant, ref(ctx.obj.get("customer")))


async def _lock_payment(conn: Conn, payment_intent: str | None) -> None:
    """The payment's lock, to the commit, taken by its purchase before it is written and by
    its refunds before they look for it: whichever comes second waits, then sees the other
    (a refund applied while its purchase was uncommitted found nothing and was lost, and
    the purchase did not see the refund's uncommitted event either)."""
    if payment_intent is not None:
        await conn.execute(queries["lock_payment"], {"payment_intent": payment_intent})


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

#: The events applied here; every other type goes to `billing_apply_v1`.
HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": checkout_completed,
    "checkout.session.async_payment_succeeded": checkout_completed,
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
    if handler is not None:
        return await handler(Context(conn, type_, obj, at, line_items))
    row = await _one(conn, "apply", {"type": type_, "obj": Jsonb(obj), "at": at})
    assert row is not None
    return Applied(row[0], row[1], row[2])
