"""Billing records: frozen dataclasses built from rows, and the outcome of a delivery."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class BillingConfig:
    """The Stripe part of the settings."""

    webhook_secrets: tuple[str, ...] = ()
    api_key: str | None = None
    api_base: str | None = None
    tolerance_seconds: int = 300
    #: Group-commit lanes for webhook deliveries: transactions in flight at once (2: one per
    #: core of the measured machine; see docs/billing.md, Performance).
    lanes: int = 2
    #: Share the waiting deliveries among the free lanes (calls side by side) rather than
    #: send them all in the next call.
    spread: bool = True
    #: The mode whose events are applied (`True` live, `False` test); `None` applies both.
    livemode: bool | None = None
    #: Connected accounts whose events are applied; events of other accounts are ignored.
    #: (Events without an `account` are the platform's own and always applied.)
    connect_accounts: tuple[str, ...] = ()

    def foreign(self, event: dict[str, object]) -> str | None:
        """Why an event is not ours to apply (another mode, another connected account), or
        None. Such an event is stored as `ignored` with that reason: no effect (W-16)."""
        livemode = event.get("livemode")
        if self.livemode is not None and isinstance(livemode, bool) and livemode != self.livemode:
            ours = "live" if self.livemode else "test"
            return (
                f"a {'live' if livemode else 'test'}-mode event; this service applies {ours} mode"
            )
        account = event.get("account")
        if isinstance(account, str) and account not in self.connect_accounts:
            return f"an event of connected account {account}, which is not configured"
        return None


@dataclass(frozen=True)
class Delivery:
    """What a webhook delivery did: `status` is the event's (`processed`, `ignored`,
    `parked`, `failed`), or `duplicate` / `conflict` for a repeated id."""

    event_id: str
    type: str
    status: str
    error: str | None = None


@dataclass(frozen=True)
class BillingEvent:
    stripe_event_id: str
    type: str
    status: str
    tenant_id: uuid.UUID | None
    user_id: uuid.UUID | None
    customer_id: str | None
    attempts: int
    last_error: str | None
    event_created: datetime
    received_at: datetime
    processed_at: datetime | None


@dataclass(frozen=True)
class SubscriptionView:
    id: str
    status: str
    plan: str | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool


@dataclass(frozen=True)
class LifetimeView:
    id: str
    plan: str
    price_id: str
    created_at: datetime


@dataclass(frozen=True)
class InvoiceView:
    id: str
    status: str | None
    plan: str | None
    amount_due: int | None
    amount_paid: int | None
    currency: str | None
    period_start: datetime | None
    period_end: datetime | None
    paid: bool
    allowance_credits: int | None


@dataclass(frozen=True)
class BillingSummary:
    """What `GET /v1/users/{id}/billing` shows."""

    plan: str
    customer_id: str | None
    subscription: SubscriptionView | None
    lifetime: LifetimeView | None
    invoices: list[InvoiceView] = field(default_factory=list)


@dataclass(frozen=True)
class SyncReport:
    """How many objects of each kind `stripe sync` reconciled, and which failed."""

    counts: dict[str, int]
    failures: list[dict[str, Any]]
