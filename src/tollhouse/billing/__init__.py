"""Billing: Stripe webhooks, customers, subscriptions, invoices, lifetime deals and credit
packs, applied exactly once and in any order, with a resync from the Stripe API."""

from tollhouse.billing.records import (
    BillingConfig,
    BillingEvent,
    BillingSummary,
    Delivery,
    InvoiceView,
    LifetimeView,
    SubscriptionView,
    SyncReport,
)
from tollhouse.billing.service import BillingService, parse_event

__all__ = [
    "BillingConfig",
    "BillingEvent",
    "BillingService",
    "BillingSummary",
    "Delivery",
    "InvoiceView",
    "LifetimeView",
    "SubscriptionView",
    "SyncReport",
    "parse_event",
]
