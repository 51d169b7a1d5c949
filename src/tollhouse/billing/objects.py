"""Reading Stripe objects in Python: ids that may be expanded, timestamps, metadata, and what
a price sells. (The frequent objects are read in SQL, migration 0009: periods that moved
between API versions, an invoice's subscription line, a price's `tollhouse_*` metadata.)"""

from __future__ import annotations

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


def metadata(obj: Obj) -> dict[str, str]:
    data = obj.get("metadata")
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


@dataclass(frozen=True)
class PriceTerms:
    """What a price sells, from its `tollhouse_*` metadata (`billing_price_terms_v1`)."""

    plan: str | None
    credits: int | None
    lifetime: bool
