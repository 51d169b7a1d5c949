"""Billing: Stripe webhooks stored and applied in one transaction, replays, the billing view
of a tenant, Checkout and the customer portal, and a resync from the Stripe API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import stripe
import structlog
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

from tollhouse import errors as e
from tollhouse.billing import handlers
from tollhouse.billing.objects import Obj, Parked, Problem, ref, ts
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
from tollhouse.billing.signature import verify
from tollhouse.db.errors import RETRYABLE_SQLSTATES
from tollhouse.db.group_commit import GroupCommit
from tollhouse.db.pool import Conn, Database
from tollhouse.db.queries import Queries

queries = Queries("tollhouse.billing", "queries.sql")
log = structlog.get_logger(__name__)

#: What billing_receive_v1 raises for a batch that must apply parked events in Python.
UNPARK = "TB003"
T = TypeVar("T")


@dataclass(frozen=True)
class Incoming:
    """A verified delivery: its event, its body as sent, the body's SHA-256 and the customer
    the event concerns."""

    event: Obj
    body: str
    digest: str
    customer_id: str | None
    #: `webhook`, or `api` for an event read from Stripe's API by `sync`.
    source: str = "webhook"

    @classmethod
    def read(cls, raw: bytes, source: str = "webhook") -> Incoming:
        """A verified body as the receiver takes it: its event (or `InvalidWebhookPayload`),
        the body, its SHA-256 and the customer the event concerns."""
        event = parse_event(raw)
        return cls(
            event,
            raw.decode(),
            hashlib.sha256(raw).hexdigest(),
            handlers.event_customer(event),
            source,
        )


def receive_params(batch: Sequence[Incoming]) -> dict[str, Any]:
    """The `receive` query's parameters for a batch, but `unpark`: the raw bodies as one JSON
    array (never serialised again in Python), their digests and customers, and the source."""
    return {
        "events": "[" + ",".join(i.body for i in batch) + "]",
        "hashes": [i.digest for i in batch],
        "customers": [i.customer_id for i in batch],
        "source": batch[0].source,  # one source a batch: `ingest` sends its events alone
    }


#: Stripe's `created`, seconds since 1970, must be a time PostgreSQL and Python both read:
#: before the year 10000.
MAX_CREATED = 253_402_300_800


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")  # NaN and Infinity: no jsonb value


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def parse_event(body: bytes) -> Obj:
    """The event in a verified body, or `InvalidWebhookPayload`."""
    try:
        event = json.loads(body.decode(), parse_constant=_not_a_number, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise e.InvalidWebhookPayload("the body is not JSON") from exc
    created = event.get("created") if isinstance(event, dict) else None
    data = event.get("data") if isinstance(event, dict) else None
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("id"), str)
        or not event["id"]
        or not isinstance(event.get("type"), str)
        or not isinstance(created, int)
        or isinstance(created, bool)
        or not isinstance(data, dict)
        or not isinstance(data.get("object"), dict)
    ):
        raise e.InvalidWebhookPayload("the body is not a Stripe event (id, type, created, data)")
    if not 0 <= created < MAX_CREATED:
        raise e.InvalidWebhookPayload("the event's created time is out of range")
    if b"\\u" in body:  # only an escape makes a NUL or half a UTF-16 pair (json refuses raw)
        # Read again keeping every pair: of a key given twice Python keeps the last value,
        # but PostgreSQL reads the body, every value included.
        problem = _unstorable_text(json.loads(body.decode(), object_pairs_hook=list))
        if problem is not None:
            raise e.InvalidWebhookPayload(f"the event contains {problem}")
    return event


def _unstorable_text(value: Any) -> str | None:
    """What in a string of `value` (keys included) PostgreSQL's jsonb cannot store: a NUL,
    or a surrogate (`json` joins the escaped pairs into one character, so what is left is
    half of one, which is no text)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):  # tuples: the pairs of an object read as a list
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "NUL characters"
            try:
                item.encode()
            except UnicodeEncodeError:
                return "an unpaired UTF-16 surrogate"
    return None


class BillingService:
    """The Stripe sync over one pool."""

    def __init__(self, db: Database, config: BillingConfig | None = None) -> None:
        self._db = db
        self.config = config or BillingConfig()
        self._client: stripe.StripeClient | None = None
        #: The receiver's calls go on connections of their own, which stay warm
        #: (`Database.lanes`).
        self.lane_db = db.lanes(self.config.lanes, "webhook-lanes")
        #: Group commit of the deliveries (Checkout and refunds aside). A customer's
        #: deliveries share a lane, so they keep their order and two batches never work
        #: on one customer at once.
        self.receiver = GroupCommit(
            self._receive,
            self._receive,
            lambda incoming: incoming.customer_id or incoming.event["id"],
            lanes=self.config.lanes,
            # Each delivery is one subtransaction: PostgreSQL caches 64 per transaction
            # before every snapshot has to look them up.
            max_batch=48,
            what="webhook delivery",
            spread=self.config.spread,
        )

    async def close(self) -> None:
        """Take no more deliveries; those queued or in flight are still answered. Then the
        lanes' connections are closed."""
        await self.receiver.close()
        await self.lane_db.close()

    # --- webhooks ----------------------------------------------------------------------------

    async def receive(self, body: bytes, signature: str | None) -> Delivery:
        """Verify, store (once per event id) and apply a webhook delivery: a 2xx answer means
        the event and its effects are committed.

        Checkout Sessions and refunds are applied by Python handlers in a transaction of their
        own; every other type goes through group commit (`GroupCommit`): one call of
        `billing_receive_v1`, one transaction, for the deliveries waiting together, each
        applied on its own in a subtransaction, in arrival order per customer."""
        if not self.config.webhook_secrets:
            raise e.WebhookNotConfigured()
        verify(
            body,
            signature,
            self.config.webhook_secrets,
            now=time.time(),
            tolerance=self.config.tolerance_seconds,
        )
        return await self._take(Incoming.read(body))

    async def _take(self, incoming: Incoming) -> Delivery:
        """Store and apply a delivery (or an event read from the API). Checkout Sessions,
        refunds and events of another mode or account go in a transaction of their own
        (Python); the others in one `billing_receive_v1` call, by group commit for
        deliveries, alone for API events (a call carries one source)."""
        event = incoming.event
        if event["type"] in handlers.HANDLERS or self.config.foreign(event):

            async def work(conn: Conn) -> Delivery:
                return await self._store_and_apply(conn, incoming)

            return await self._db.transaction(work)
        if incoming.source == "api":
            # Alone, on the main pool: the lanes' connections are the receiver's calls' only.
            return (await self._receive([incoming], self._db))[0]
        return await self.receiver.submit(incoming)

    async def _receive(
        self, batch: Sequence[Incoming], db: Database | None = None
    ) -> list[Delivery]:
        """Store and apply a batch of deliveries: one `billing_receive_v1` call that is its
        own transaction (one round trip). A batch that links a customer with parked events
        is sent again in a transaction that also applies those, oldest first."""
        params = receive_params(batch)

        async def alone(conn: Conn) -> list[Any] | None:
            try:
                cur = await conn.execute(queries["receive"], {**params, "unpark": False})
            except psycopg.Error as exc:
                if exc.sqlstate == UNPARK:
                    return None
                raise
            return await cur.fetchall()

        async def unparking(conn: Conn) -> list[Any]:
            cur = await conn.execute(queries["receive"], {**params, "unpark": True})
            rows = await cur.fetchall()
            for customer in dict.fromkeys(row[5] for row in rows if row[6]):
                await self._unpark(conn, customer)
            return rows

        on = db or self.lane_db
        rows = await on.retrying(alone)
        if rows is None:
            rows = await on.transaction(unparking)
        priced = [row[0] for row in rows if row[2] == "processed" and row[1].startswith("price.")]
        if priced:
            objects = {i.event["id"]: ref(i.event["data"]["object"]) for i in batch}
            await self._retry_waiting_on("price_id", (objects[event_id] for event_id in priced))
        healing = [row[5] for row in rows if row[7]]
        if healing:
            await self._retry_waiting_on("customer_id", healing)
        return [self._delivered(row[0], row[1], row[2], row[3]) for row in rows]

    async def _retry_waiting_on(self, kind: str, keys: Iterable[str | None]) -> None:
        """Retry the failed events that can apply now that a price or a subscription is
        stored, in whatever order Stripe sent them and it:

        - `price_id`: the events that named the price while it was unknown here or sold
          nothing, once it sells a plan or credits (a price that sells nothing heals nothing,
          so its edits retry nothing);
        - `customer_id`: the customer's paid invoices whose plan could not be told (a price
          id unknown here and their subscription not stored), once their subscription is
          stored with one.

        Each is retried on its own; what fails again keeps its reason. Prices change rarely,
        and invoices fail so rarely: this costs those deliveries, not the others."""
        query = queries["failed_on_price" if kind == "price_id" else "failed_on_subscription"]
        for key in dict.fromkeys(k for k in keys if k):
            try:
                async with self._db.connection() as conn:
                    cur = await conn.execute(query, {kind: key})
                    waiting = [row[0] for row in await cur.fetchall()]
            except (e.TollhouseError, psycopg.Error) as exc:
                log.warning("stripe_event_retries_failed", **{kind: key}, error=str(exc))
                continue
            for event_id in waiting:
                try:
                    retried = await self.retry(event_id, healing=True)
                except Exception as exc:
                    # The delivery that healed it is committed and must be answered 2xx:
                    # this event stays failed, for `stripe replay`.
                    log.warning(
                        "stripe_event_retry_failed",
                        event_id=event_id,
                        **{kind: key},
                        error=str(exc),
                    )
                    continue
                log.info(
                    "stripe_event_retried", event_id=event_id, **{kind: key}, status=retried.status
                )

    @staticmethod
    def _delivered(event_id: str, type_: str, status: str, error: str | None) -> Delivery:
        if status == "conflict":
            log.warning("stripe_event_conflict", event_id=event_id)
        elif error:
            log.warning("stripe_event_failed", event_id=event_id, type=type_, error=error)
        return Delivery(event_id, type_, status, error)

    async def _store_and_apply(self, conn: Conn, incoming: Incoming) -> Delivery:
        event = incoming.event
        cur = await conn.execute(
            queries["store_event"],
            {
                "id": event["id"],
                "type": event["type"],
                "hash": incoming.digest,
                "payload": incoming.body,
                "created": ts(event["created"]),
                "customer_id": incoming.customer_id,
                "source": incoming.source,
            },
        )
        if await cur.fetchone() is None:
            # A concurrent first delivery held the row until it committed; now it is seen.
            cur = await conn.execute(queries["event_hash"], {"id": event["id"]})
            row = await cur.fetchone()
            assert row is not None
            # An event read from the API has no body as Stripe signed it: its id decides.
            if row[0] != incoming.digest and "api" not in (row[2], incoming.source):
                await conn.execute(
                    queries["record_conflict"], {"id": event["id"], "hash": incoming.digest}
                )
                return self._delivered(event["id"], event["type"], "conflict", None)
            return Delivery(event["id"], event["type"], "duplicate")
        return await self._process(conn, event)

    async def _process(self, conn: Conn, event: Obj, *, unpark: bool = True) -> Delivery:
        """Apply a stored event (locked by the caller's transaction) and record its status;
        then, unless it is itself being unparked, the customer's parked events."""
        at = ts(event["created"]) or datetime.now(UTC)
        foreign = self.config.foreign(event)
        if foreign or event["type"] in handlers.HANDLERS:
            status: str
            error: str | None
            if foreign:  # another mode or account: kept, with the reason, and not applied
                status, error = "ignored", foreign
                tenant, customer = None, handlers.event_customer(event)
            else:
                status, error, tenant, customer = await self._apply_in_python(conn, event, at)
            cur = await conn.execute(
                queries["finish_event"],
                {
                    "id": event["id"],
                    "status": status,
                    "error": error,
                    "tenant_id": tenant,
                    "customer_id": customer,
                },
            )
            row = await cur.fetchone()
            waiting = bool(row and row[0])
        else:
            cur = await conn.execute(
                queries["process"],
                {
                    "id": event["id"],
                    "type": event["type"],
                    "obj": Jsonb(event["data"]["object"]),
                    "at": at,
                    "customer_id": handlers.event_customer(event),
                },
            )
            found = await cur.fetchone()
            assert found is not None
            status, error, tenant, customer, waiting = found
        if unpark and waiting:
            await self._unpark(conn, customer)
        return self._delivered(event["id"], event["type"], status, error)

    async def _apply_in_python(
        self, conn: Conn, event: Obj, at: datetime
    ) -> tuple[str, str | None, uuid.UUID | None, str | None]:
        """Status, error, tenant and customer of an event applied by a Python handler in a
        savepoint: a failure leaves no partial write.

        A parked event takes its customer's lock again, to the commit (the savepoint's
        rollback released it), as `billing_try_apply_v1` does (migration 0021): a link made
        later waits and then unparks it; one committed in between is seen, and the event is
        applied at once."""
        outcome = await self._apply_in_python_once(conn, event, at)
        if outcome[0] == "parked" and await handlers.route(conn, outcome[3]) is not None:
            outcome = await self._apply_in_python_once(conn, event, at)
        return outcome

    async def _apply_in_python_once(
        self, conn: Conn, event: Obj, at: datetime
    ) -> tuple[str, str | None, uuid.UUID | None, str | None]:
        status, error, tenant, customer = "processed", None, None, handlers.event_customer(event)
        try:
            async with conn.transaction():
                applied = await handlers.apply(
                    conn,
                    event["type"],
                    event["data"]["object"],
                    at,
                    self._line_items if self.config.api_key else None,
                )
            status, tenant = applied.status, applied.tenant_id
            customer = applied.customer_id or customer
        except Parked as parked:
            status, customer = "parked", parked.customer_id
        except Problem as problem:
            status, error = "failed", str(problem)
        except e.TollhouseError as exc:
            if exc.fields.get("sqlstate") in RETRYABLE_SQLSTATES:
                raise
            status, error = "failed", exc.message
        except psycopg.Error as exc:
            if exc.sqlstate in RETRYABLE_SQLSTATES or isinstance(exc, psycopg.OperationalError):
                raise
            status, error = "failed", str(exc).strip().splitlines()[0]
        except (ValueError, TypeError, KeyError, ArithmeticError, OverflowError) as exc:
            # A signed object we cannot read (an impossible timestamp, a missing field): the
            # event is kept as failed with the reason, never a 500 that loses it.
            status, error = "failed", f"unreadable {event['type']}: {type(exc).__name__}: {exc}"
        return status, error, tenant, customer

    async def _unpark(self, conn: Conn, customer_id: str | None) -> None:
        """Apply the events parked for a customer that is now linked, oldest first; then
        again its invoices that failed because their subscription came after them (among
        the parked events, or a subscription `stripe sync` just applied)."""
        for waiting in ("parked_events", "failed_on_subscription"):
            cur = await conn.execute(queries[waiting], {"customer_id": customer_id})
            for _id, _type, _status, payload in await cur.fetchall():
                await self._process(conn, payload, unpark=False)

    async def retry(self, event_id: str, *, healing: bool = False) -> Delivery:
        """Apply a stored event again (failed, parked or received ones; a processed or
        ignored one is left as it is).

        An invoice that fails because its plan could not be told keeps its customer's lock
        to the commit and then looks for its subscription: one applied meanwhile skipped it
        while this retry held its row (`failed_on_subscription` is SKIP LOCKED), and
        committed before this retry could. `healing`: a retry made by such a look, which
        does not look again."""

        async def work(conn: Conn) -> tuple[Delivery, Obj | None]:
            cur = await conn.execute(queries["lock_event"], {"id": event_id})
            row = await cur.fetchone()
            if row is None:
                raise e.BillingEventNotFound(event_id=event_id)
            _id, type_, status, payload = row
            if status in ("processed", "ignored"):
                return Delivery(event_id, type_, status), None
            delivery = await self._process(conn, payload)
            if _waits_for_its_subscription(delivery):
                # Its failed application released the customer's lock with its
                # subtransaction: taken again to the commit, so that a subscription applied
                # meanwhile commits before this retry does, and its look below sees it.
                customer = handlers.event_customer(payload)
                await conn.execute(queries["route"], {"customer_id": customer})
            return delivery, payload

        delivery, applied = await self._db.transaction(work)
        if applied is None:
            return delivery
        processed = delivery.status == "processed"
        if processed and delivery.type.startswith("price."):
            # A replayed price heals what waits on it; so does a subscription.
            await self._retry_waiting_on("price_id", [ref(applied["data"]["object"])])
        elif (processed and delivery.type.startswith("customer.subscription.")) or (
            not healing and _waits_for_its_subscription(delivery)
        ):
            await self._retry_waiting_on("customer_id", [handlers.event_customer(applied)])
        return delivery

    async def replay(self, status: str = "failed") -> list[Delivery]:
        """Retry every stored event of a status (`failed`, `received` or `parked`)."""
        if status not in ("failed", "received", "parked"):
            raise e.InvalidRequest("status must be failed, received or parked", field="status")
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["event_ids_by_status"], {"status": status})
            ids = [row[0] for row in await cur.fetchall()]
        return [await self.retry(event_id) for event_id in ids]

    async def events(self, *, status: str | None = None, limit: int = 50) -> list[BillingEvent]:
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(BillingEvent))
            await cur.execute(queries["events"], {"status": status, "limit": limit})
            return await cur.fetchall()

    async def event(self, event_id: str) -> BillingEvent:
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(BillingEvent))
            await cur.execute(queries["event"], {"id": event_id})
            found = await cur.fetchone()
        if found is None:
            raise e.BillingEventNotFound(event_id=event_id)
        return found

    # --- what a tenant has -------------------------------------------------------------------

    async def personal_tenant(self, user_id: uuid.UUID) -> uuid.UUID:
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["personal_tenant"], {"user_id": user_id})
            row = await cur.fetchone()
        if row is None or row[0] is None:
            raise e.UserNotFound(user_id=str(user_id))
        return uuid.UUID(str(row[0]))

    async def summary(self, tenant_id: uuid.UUID) -> BillingSummary:
        """The effective plan, customer, current subscription, lifetime deal and invoices."""
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(queries["summary"], {"tenant_id": tenant_id})
            row = await cur.fetchone()
        assert row is not None
        sub, life = row["subscription"], row["lifetime"]
        return BillingSummary(
            plan=row["plan"],
            customer_id=row["customer_id"],
            subscription=SubscriptionView(
                **_times(sub, "current_period_start", "current_period_end")
            )
            if sub
            else None,
            lifetime=LifetimeView(**_times(life, "created_at")) if life else None,
            invoices=[
                InvoiceView(**_times(i, "period_start", "period_end")) for i in row["invoices"]
            ],
        )

    # --- outbound: Checkout and the portal -------------------------------------------------

    @property
    def client(self) -> stripe.StripeClient:
        """The StripeClient instance (no module-global configuration)."""
        if not self.config.api_key:
            raise e.StripeNotConfigured()
        if self._client is None:
            bases: Any = {"api": self.config.api_base} if self.config.api_base else None
            self._client = stripe.StripeClient(
                self.config.api_key, base_addresses=bases, max_network_retries=2
            )
        return self._client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking SDK call in a thread; Stripe's errors become `StripeUnavailable` (or
        `InvalidRequest` for what Stripe refused)."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except stripe.IdempotencyError as exc:
            # A caller's Idempotency-Key sent again with another request: not Stripe failing.
            raise e.IdempotencyConflict(
                "this Idempotency-Key was used for another request (another price or URLs)"
            ) from exc
        except stripe.InvalidRequestError as exc:
            raise e.InvalidRequest(
                f"Stripe refused the request: {exc.user_message or exc}"
            ) from exc
        except stripe.StripeError as exc:
            raise e.StripeUnavailable(f"Stripe failed: {exc.user_message or exc}") from exc

    async def customer_for(self, tenant_id: uuid.UUID) -> str:
        """The tenant's Stripe customer, created on first use. The idempotency key is the
        tenant and how many of its customers were deleted, so two racing calls create one
        customer at Stripe, and a customer made after a deletion is a new one (not Stripe's
        replay of the deleted one, for 24 hours)."""
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["customer_of_tenant"], {"tenant_id": tenant_id})
            row = await cur.fetchone()
        assert row is not None
        customer, deleted = row
        if customer is not None:
            return str(customer)
        key = f"tollhouse-customer-{tenant_id}" + (f"-{deleted}" if deleted else "")
        created = await self._call(
            self.client.v1.customers.create,
            params={"metadata": {"tollhouse_tenant_id": str(tenant_id)}},
            options={"idempotency_key": key},
        )

        async def work(conn: Conn) -> None:
            # Events about the new customer may have come (and parked) before this link.
            if await handlers.link(conn, created.id, tenant_id):
                await self._unpark(conn, created.id)

        await self._db.transaction(work)
        return str(created.id)

    async def checkout(
        self,
        tenant_id: uuid.UUID,
        *,
        price_id: str,
        success_url: str,
        cancel_url: str,
        operation_id: str | None = None,
    ) -> str:
        """A Checkout Session's URL for one price (subscription or one-time)."""
        current = None
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["price"], {"id": price_id})
            price = await cur.fetchone()
            if price is not None and price[4] == "recurring":
                cur = await conn.execute(queries["current_subscription"], {"tenant_id": tenant_id})
                current = await cur.fetchone()
        if price is None or not price[5]:
            raise e.PriceNotFound(price_id=price_id)
        _id, plan, credits, lifetime, type_, _active = price
        # Only what the handlers will apply is sold: a subscription needs a plan; a one-time
        # payment, a credit pack or a lifetime deal of a plan. (A one-time price with only a
        # plan, or a recurring one with only credits, was paid for and then failed.)
        sells = (
            plan is not None
            if type_ == "recurring"
            else (credits is not None or (bool(lifetime) and plan is not None))
        )
        if not sells:
            raise e.PriceNotFound(
                f"price {price_id} sells nothing Tollhouse applies: a recurring price needs"
                " tollhouse_plan; a one-time price tollhouse_credits, or tollhouse_lifetime=true"
                " with tollhouse_plan",
                price_id=price_id,
            )
        if current is not None:
            # A second subscription would pay twice for one plan: a plan changes in the portal.
            raise e.AlreadySubscribed(
                f"the tenant is already subscribed ({current[0]}): change its plan in the"
                " customer portal (POST .../portal)",
                subscription_id=str(current[0]),
            )
        customer = await self.customer_for(tenant_id)
        mode = "subscription" if type_ == "recurring" else "payment"
        # One purchase attempt a call: a second purchase of the same price must get a new
        # session, not Stripe's replay of the first one, completed or expired. A caller that
        # retries passes its own key (`Idempotency-Key`), scoped by what it asks for.
        key = (
            f"{tenant_id}:{customer}:{price_id}:{success_url}:{cancel_url}:{operation_id}"
            if operation_id
            else str(uuid.uuid4())
        )
        session = await self._call(
            self.client.v1.checkout.sessions.create,
            params={
                "mode": mode,
                "customer": customer,
                "client_reference_id": str(tenant_id),
                "line_items": [{"price": price_id, "quantity": 1}],
                "success_url": success_url,
                "cancel_url": cancel_url,
                "metadata": {"tollhouse_tenant_id": str(tenant_id), "tollhouse_price_id": price_id},
            },
            options={"idempotency_key": "tollhouse-checkout-" + _digest(key)},
        )
        return str(session.url)

    async def portal(
        self,
        tenant_id: uuid.UUID,
        *,
        return_url: str | None = None,
        operation_id: str | None = None,
    ) -> str:
        """A customer-portal session's URL. The key covers the SDK's own retries of this call
        (a new call is a new session, as Stripe's sessions are short-lived); `operation_id`
        makes it the caller's, for a library caller that retries within those minutes."""
        customer = await self.customer_for(tenant_id)
        params: dict[str, Any] = {"customer": customer}
        if return_url:
            params["return_url"] = return_url
        session = await self._call(
            self.client.v1.billing_portal.sessions.create,
            params=params,
            options={
                "idempotency_key": "tollhouse-portal-"
                + _digest(f"{tenant_id}:{operation_id}" if operation_id else str(uuid.uuid4()))
            },
        )
        return str(session.url)

    async def _line_items(self, session_id: str) -> list[Obj]:
        items = await self._call(self.client.v1.checkout.sessions.line_items.list, session_id)
        return list(_raw(items).get("data") or [])

    # --- resync ------------------------------------------------------------------------------

    async def sync(self, *, since: datetime | None = None) -> SyncReport:
        """Ingest the events Stripe kept that never arrived (`ingest`), then page through
        products, prices, customers, subscriptions (canceled ones too) and invoices at
        Stripe and apply each as of the moment its page was asked for: the
        fetched state is newer than any event sent before that, and older than any sent
        after (which then wins)."""
        counts: dict[str, int] = {"unlinked": 0, "events": 0, "events_known": 0}
        failures: list[dict[str, Any]] = []
        created = {"gte": int(since.timestamp())} if since else None
        # First the events Stripe still has (30 days) that never arrived here: each is
        # stored and applied as its delivery would have been (W-12).
        params = {"limit": 100, **({"created": created} if created else {})}
        async for event, _ in self._pages(self.client.v1.events.list, params):
            try:
                delivery = await self.ingest(event)
            except e.InvalidWebhookPayload as exc:
                failures.append({"kind": "events", "id": ref(event), "error": exc.message})
                continue
            known = delivery.status in ("duplicate", "conflict")
            counts["events_known" if known else "events"] += 1
            if delivery.status == "failed":
                failures.append(
                    {"kind": "events", "id": delivery.event_id, "error": delivery.error or ""}
                )
        kinds: list[tuple[str, Any, dict[str, Any], Callable[[Obj], str]]] = [
            ("products", self.client.v1.products, {}, lambda o: "product.updated"),
            ("prices", self.client.v1.prices, {}, lambda o: "price.updated"),
            ("customers", self.client.v1.customers, {}, _customer_type),
            ("subscriptions", self.client.v1.subscriptions, {"status": "all"}, _subscription_type),
            ("invoices", self.client.v1.invoices, {}, _invoice_type),
        ]
        for name, service, extra, type_of in kinds:
            params = {**extra, "limit": 100, **({"created": created} if created else {})}
            counts[name] = 0
            async for obj, fetched_at in self._pages(service.list, params):
                try:
                    await self._apply_fetched(type_of(obj), obj, fetched_at)
                    counts[name] += 1
                except Parked:  # a customer of no tenant here: nothing to reconcile
                    counts["unlinked"] += 1
                except (Problem, e.TollhouseError) as exc:
                    failures.append({"kind": name, "id": ref(obj), "error": str(exc)})
        return SyncReport(counts, failures)

    async def ingest(self, event: Obj) -> Delivery:
        """Store and apply an event read from Stripe's API (not a signed delivery) exactly as
        a delivery would be, marked `source = 'api'`: an id stored before, or delivered
        later, is a duplicate by its id (its body is our serialisation, not Stripe's)."""
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        try:
            raw = body.encode()
        except UnicodeEncodeError as exc:  # half of a surrogate pair, as a delivery's would be
            raise e.InvalidWebhookPayload(
                "the event contains an unpaired UTF-16 surrogate"
            ) from exc
        return await self._take(Incoming.read(raw, source="api"))

    async def _apply_fetched(self, type_: str, obj: Obj, at: datetime) -> None:
        async def work(conn: Conn) -> None:
            applied = await handlers.apply(conn, type_, obj, at, self._line_items)
            if applied.tenant_id is not None and applied.customer_id is not None:
                await self._unpark(conn, applied.customer_id)

        await self._db.transaction(work)
        if type_.startswith("price."):
            await self._retry_waiting_on("price_id", [ref(obj)])

    async def _pages(
        self, list_fn: Callable[..., Any], params: dict[str, Any]
    ) -> AsyncIterator[tuple[Obj, datetime]]:
        """Each object with the time its state is known as of: the second before its page
        was asked for (Stripe stamps events in whole seconds), so an event about a change
        made while the page was on its way is newer, and wins."""
        after: str | None = None
        while True:
            as_of = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
            page = await self._call(
                list_fn, params={**params, **({"starting_after": after} if after else {})}
            )
            raw = _raw(page)
            for item in raw.get("data") or []:
                yield item, as_of
            if not raw.get("has_more") or not raw.get("data"):
                return
            after = raw["data"][-1]["id"]


def _waits_for_its_subscription(delivery: Delivery) -> bool:
    """An invoice that failed because its plan could not be told (a price unknown here or
    selling nothing, its subscription not stored)."""
    return (
        delivery.status == "failed"
        and delivery.type.startswith("invoice.")
        and (delivery.error or "").startswith("unknown price ")
    )


def _raw(obj: Any) -> Obj:
    """The JSON Stripe sent (the SDK's objects carry Decimals for *_decimal fields)."""
    response = getattr(obj, "last_response", None)
    if response is not None and isinstance(response.data, dict):
        return response.data
    return dict(json.loads(json.dumps(obj.to_dict(), default=str)))


def _customer_type(obj: Obj) -> str:
    return "customer.deleted" if obj.get("deleted") else "customer.updated"


def _subscription_type(obj: Obj) -> str:
    if obj.get("status") == "canceled":
        return "customer.subscription.deleted"
    return "customer.subscription.updated"


def _invoice_type(obj: Obj) -> str:
    return "invoice.paid" if obj.get("status") == "paid" else "invoice.updated"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:48]


def _times(row: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: (datetime.fromisoformat(v) if k in names and v else v) for k, v in row.items()}


__all__ = ["BillingService", "parse_event"]
