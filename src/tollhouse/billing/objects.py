"""Reading Stripe objects: ids that may be expanded, periods that moved between API versions,
and the `tollhouse_*` metadata that maps a price to a plan, a credit pack or a lifetime deal."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]


class Problem(Exception):
    """A business-level reason the event cannot be applied; it is stored as `failed`."""


class Parked(Exception):
    """The event's customer is linked to no tenant yet."""

    def __init__(self, customer_id: str) -> None:
        super().__init__(customer_id)
        self.customer_id = customer_id


def ref(value: Any) -> str | None:
    """An id, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def ts(value: Any) -> datetime | None:
    """A Stripe Unix timestamp as an aware datetime."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return datetime.fromtimestamp(value, UTC)


def as_uuid(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def metadata(obj: Obj) -> dict[str, str]:
    data = obj.get("metadata")
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


@dataclass(frozen=True)
class PriceTerms:
    """What a price sells, from its `tollhouse_*` metadata."""

    plan: str | None
    credits: int | None
    lifetime: bool

    @property
    def sells_something(self) -> bool:
        return self.plan is not None or self.credits is not None


def price_terms(price: Obj) -> PriceTerms:
    meta = metadata(price)
    plan = meta.get("tollhouse_plan") or None
    raw_credits = meta.get("tollhouse_credits")
    credits: int | None = None
    if raw_credits:
        if not raw_credits.isdigit() or int(raw_credits) <= 0:
            raise Problem(f"price {price.get('id')}: tollhouse_credits must be a positive integer")
        credits = int(raw_credits)
    lifetime = meta.get("tollhouse_lifetime", "").lower() == "true"
    if lifetime and plan is None:
        raise Problem(f"price {price.get('id')}: tollhouse_lifetime needs tollhouse_plan")
    return PriceTerms(plan, credits, lifetime)


def subscription_item(sub: Obj) -> Obj:
    items = (sub.get("items") or {}).get("data") or []
    return items[0] if items and isinstance(items[0], dict) else {}


def subscription_period(sub: Obj) -> tuple[datetime | None, datetime | None]:
    """The current period: on the subscription before API 2025-03-31, on its items after."""
    item = subscription_item(sub)
    start = sub.get("current_period_start") or item.get("current_period_start")
    end = sub.get("current_period_end") or item.get("current_period_end")
    return ts(start), ts(end)


def invoice_subscription(invoice: Obj) -> str | None:
    """The invoice's subscription: top level before 2025-03-31, under `parent` after."""
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") or {}
    return ref(invoice.get("subscription")) or ref(details.get("subscription"))


def invoice_line(invoice: Obj) -> Obj:
    """The invoice's subscription line (else its first line)."""
    lines = (invoice.get("lines") or {}).get("data") or []
    for line in lines:
        parent = line.get("parent") or {}
        if line.get("type") == "subscription" or parent.get("type") == "subscription_item_details":
            return dict(line)
    return dict(lines[0]) if lines else {}


def line_price(line: Obj) -> Obj | str | None:
    """The line's price: an object (older APIs), or an id under `pricing` (newer)."""
    if isinstance(line.get("price"), dict):
        return dict(line["price"])
    pricing = line.get("pricing") or {}
    details = pricing.get("price_details") or {}
    return ref(details.get("price")) or ref(line.get("price"))


def invoice_period(invoice: Obj) -> tuple[datetime | None, datetime | None]:
    """The service period the invoice pays for: its subscription line's period (the
    invoice's own period_start/end describe the previous period for renewals)."""
    period = invoice_line(invoice).get("period") or {}
    start = period.get("start") or invoice.get("period_start")
    end = period.get("end") or invoice.get("period_end")
    return ts(start), ts(end)
