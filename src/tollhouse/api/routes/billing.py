"""Billing: the Stripe webhook (authenticated by its signature), a user's billing view,
Checkout and portal sessions, and the stored events (service key)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field

from tollhouse.api.deps import ServiceKey, TollhouseDep
from tollhouse.api.schemas import Strict
from tollhouse.api.webhook import PATH as WEBHOOK_PATH
from tollhouse.api.webhook import bounded_body
from tollhouse.billing import BillingEvent, BillingSummary, Delivery

router = APIRouter(tags=["billing"])


class DeliveryOut(BaseModel):
    id: str
    type: str
    status: str = Field(
        description="processed, ignored, parked, failed; duplicate or conflict for an id"
        " already stored (a conflict: another body under the same id, not applied)."
    )
    error: str | None = None

    @classmethod
    def of(cls, delivery: Delivery) -> DeliveryOut:
        return cls(
            id=delivery.event_id, type=delivery.type, status=delivery.status, error=delivery.error
        )


class SubscriptionOut(BaseModel):
    id: str
    status: str
    plan: str | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool


class LifetimeOut(BaseModel):
    id: str
    plan: str
    price_id: str
    created_at: datetime


class InvoiceOut(BaseModel):
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


class BillingOut(BaseModel):
    plan: str = Field(description="The effective plan.")
    customer_id: str | None
    subscription: SubscriptionOut | None
    lifetime: LifetimeOut | None
    invoices: list[InvoiceOut]

    @classmethod
    def of(cls, summary: BillingSummary) -> BillingOut:
        return cls.model_validate(summary, from_attributes=True)


class CheckoutBody(Strict):
    price_id: str = Field(min_length=1, max_length=255)
    success_url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://")
    cancel_url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://")


class PortalBody(Strict):
    return_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://")


class UrlOut(BaseModel):
    url: str


#: A caller's key for one purchase: the same key again (a retried request) gets the same
#: Checkout Session; without one, every request is a new session.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Retries with the same key, price and URLs get the same Checkout Session"
        " (for 24 hours); another price or URLs make another session.",
    ),
]


class EventOut(BaseModel):
    id: str
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

    @classmethod
    def of(cls, event: BillingEvent) -> EventOut:
        return cls(
            id=event.stripe_event_id,
            **{k: v for k, v in vars(event).items() if k != "stripe_event_id"},
        )


class EventList(BaseModel):
    events: list[EventOut]


@router.post(
    WEBHOOK_PATH,
    response_model=DeliveryOut,
    summary="Receive a Stripe event (authenticated by its Stripe-Signature)",
    description="The event is stored and applied in one transaction before the answer: a 2xx"
    " means it is committed. A repeated id answers 200 and changes nothing.",
    responses={
        400: {"description": "invalid_signature, invalid_payload: nothing stored"},
        503: {"description": "webhook_not_configured"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def webhook(
    request: Request,
    tollhouse: TollhouseDep,
    stripe_signature: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> DeliveryOut:
    # What answers when the short path (`tollhouse.api.webhook`) is off; the same steps.
    body = await bounded_body(request.receive, request.headers.get("content-length"))
    delivery = await tollhouse.billing.receive(body, stripe_signature)
    request.app.state.metrics.count_stripe_event(delivery.status)
    return DeliveryOut.of(delivery)


@router.get(
    "/v1/users/{user_id}/billing",
    response_model=BillingOut,
    summary="A user's effective plan, subscription, lifetime deal and invoices",
    responses={404: {"description": "user_not_found"}},
)
async def user_billing(user_id: uuid.UUID, _: ServiceKey, tollhouse: TollhouseDep) -> BillingOut:
    tenant = await tollhouse.billing.personal_tenant(user_id)
    return BillingOut.of(await tollhouse.billing.summary(tenant))


@router.post(
    "/v1/users/{user_id}/checkout",
    response_model=UrlOut,
    summary="A Stripe Checkout Session for one price (creates the customer on first use)",
    responses={
        404: {"description": "user_not_found"},
        409: {"description": "already_subscribed, idempotency_conflict"},
        422: {"description": "unknown_price"},
        502: {"description": "stripe_unavailable"},
        503: {"description": "stripe_not_configured"},
    },
)
async def checkout(
    user_id: uuid.UUID,
    body: CheckoutBody,
    _: ServiceKey,
    tollhouse: TollhouseDep,
    idempotency_key: IdempotencyKey = None,
) -> UrlOut:
    tenant = await tollhouse.billing.personal_tenant(user_id)
    url = await tollhouse.billing.checkout(
        tenant,
        price_id=body.price_id,
        success_url=body.success_url,
        cancel_url=body.cancel_url,
        operation_id=idempotency_key,
    )
    return UrlOut(url=url)


@router.post(
    "/v1/users/{user_id}/portal",
    response_model=UrlOut,
    summary="A Stripe customer-portal session",
    responses={
        404: {"description": "user_not_found"},
        502: {"description": "stripe_unavailable"},
        503: {"description": "stripe_not_configured"},
    },
)
async def portal(
    user_id: uuid.UUID,
    _: ServiceKey,
    tollhouse: TollhouseDep,
    body: PortalBody | None = None,
) -> UrlOut:
    tenant = await tollhouse.billing.personal_tenant(user_id)
    url = await tollhouse.billing.portal(tenant, return_url=body.return_url if body else None)
    return UrlOut(url=url)


@router.get("/v1/stripe/events", response_model=EventList, summary="Stored Stripe events")
async def events(
    _: ServiceKey,
    tollhouse: TollhouseDep,
    status: Literal["received", "processed", "failed", "ignored", "parked"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> EventList:
    found = await tollhouse.billing.events(status=status, limit=limit)
    return EventList(events=[EventOut.of(event) for event in found])


@router.get(
    "/v1/stripe/events/{event_id}",
    response_model=EventOut,
    summary="One stored Stripe event",
    responses={404: {"description": "billing_event_not_found"}},
)
async def event(event_id: str, _: ServiceKey, tollhouse: TollhouseDep) -> EventOut:
    return EventOut.of(await tollhouse.billing.event(event_id))


@router.post(
    "/v1/stripe/events/{event_id}/retry",
    response_model=DeliveryOut,
    summary="Apply a failed, parked or received event again",
    responses={404: {"description": "billing_event_not_found"}},
)
async def retry(event_id: str, _: ServiceKey, tollhouse: TollhouseDep) -> DeliveryOut:
    return DeliveryOut.of(await tollhouse.billing.retry(event_id))
