"""Migration 0017: inside a batch of webhook deliveries (one `billing_receive_v1` call of
more than one), the plan moves are deferred to one set-wise move. The same deliveries, sent
one per call and then in batches on the same state, give the same outcomes, accounts,
grants, ledger rows, subscriptions and invoices; a failing deferred move fails the whole
call, and the deliveries sent again alone give each its own outcome."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from tests.support import billing as b
from tests.support import fake_stripe as fs
from tests.support.credit_state import CREDIT_STATE
from tollhouse.app import Tollhouse
from tollhouse.billing.service import Incoming, receive_params
from tollhouse.credits import DebitRequest, conservation_problems

RECEIVE = (
    "SELECT stripe_event_id, status, error FROM tollhouse.billing_receive_v1("
    "%(events)s::jsonb, %(hashes)s, %(customers)s, true, %(source)s)"
)

STATE = (
    "SELECT"
    + CREDIT_STATE
    + """,
       (SELECT array_agg(row(id, status, plan, current_period_end, stripe_at)::text ORDER BY id)
        FROM tollhouse.subscriptions WHERE tenant_id = %(t)s),
       (SELECT array_agg(row(id, status, plan, paid, allowance_granted_at IS NOT NULL,
                             allowance_credits)::text ORDER BY id)
        FROM tollhouse.invoices WHERE tenant_id = %(t)s)
"""
)


LAPSED_PERIOD = """
UPDATE tollhouse.credit_grants SET expires_at = now() - interval '10 days'
WHERE tenant_id = %(t)s AND source = 'plan' AND remaining > 0;
UPDATE tollhouse.credit_accounts
SET created_at = now() - interval '40 days', period_start = now() - interval '40 days',
    period_end = now() - interval '10 days', allowance_for = now() - interval '40 days'
WHERE tenant_id = %(t)s;
"""

LAPSED_PROMO = """
SELECT tollhouse.credit_apply_grant_v1(%(t)s, 30, 'promo', %(id)s, 1, now() + interval '1 day',
                                       'grant.promo', NULL);
UPDATE tollhouse.credit_grants SET expires_at = now() - interval '1 hour'
WHERE tenant_id = %(t)s AND source_id = %(id)s;
"""


def receive(conn: psycopg.Connection[Any], events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """One `billing_receive_v1` call, as the service makes it."""
    return conn.execute(RECEIVE, receive_params(incoming(events))).fetchall()


def incoming(events: list[dict[str, Any]]) -> list[Incoming]:
    return [Incoming.read(json.dumps(e).encode()) for e in events]


def function_calls(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT funcname, calls FROM pg_stat_xact_user_functions WHERE schemaname = 'tollhouse'"
    ).fetchall()
    return {name: calls for name, calls in rows}


@dataclass
class Tenant:
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    customers: list[str]


async def tenants(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    n: int,
    *,
    all_with_two: bool = False,
) -> list[Tenant]:
    """`n` linked tenants; the last one (or, `all_with_two`, each) has a second customer."""
    await b.load_prices(client)
    made = [await b.linked_customer(client, auth) for _ in range(n)]
    found = [Tenant(c.tenant_id, c.user_id, [c.customer_id]) for c in made]
    async with tollhouse.db.connection() as conn:
        for t in found if all_with_two else found[-1:]:
            t.customers.append(fs.new_id("cus"))
            await conn.execute(
                "SELECT tollhouse.billing_link_v1(%s, %s)", (t.customers[1], t.tenant_id)
            )
    return found


def subscribed(
    customer: str,
    period: tuple[int, int],
    price: str = b.PRO,
    *,
    sub_id: str | None = None,
    created: int | None = None,
    type_: str = "customer.subscription.created",
) -> dict[str, Any]:
    """A delivery of `customer`'s active subscription (`sub_id`, else sub_<customer>) to
    `price` for `period` (one period for a whole test: the newest period end wins)."""
    start, end = period
    obj = fs.subscription(
        sub_id or f"sub_{customer}", customer, b.PRICES[price], start=start, end=end
    )
    return fs.event(type_, obj, created=created)


def scenario(
    rng: random.Random, tenant: Tenant, t0: int, subs: dict[str, str]
) -> list[dict[str, Any]]:
    """A tenant's deliveries in order (`subs`: each customer's subscription id): created,
    changed between plans, past due, canceled, some out of date; paid invoices of either
    plan; customer updates; an unknown price (a failed event, rolled back inside the batch)."""
    start, end = b.period()
    events: list[dict[str, Any]] = []
    t = t0
    for _ in range(rng.randint(3, 8)):
        customer = rng.choice(tenant.customers)
        sub_id = subs[customer]
        t += rng.randint(1, 20)
        kind = rng.choices(["sub", "stale", "invoice", "customer", "bad"], [6, 1, 2, 1, 1])[0]
        price = b.PRICES[rng.choice([b.PRO, b.STARTER])]
        if kind in ("sub", "stale"):
            status = rng.choice(["active", "active", "trialing", "past_due", "canceled"])
            obj = fs.subscription(sub_id, customer, price, status=status, start=start, end=end)
            type_ = (
                "customer.subscription.deleted"
                if status == "canceled"
                else rng.choice(["customer.subscription.created", "customer.subscription.updated"])
            )
            events.append(fs.event(type_, obj, created=t - 200 if kind == "stale" else t))
        elif kind == "invoice":
            obj = fs.invoice(fs.new_id("in"), customer, sub_id, price, start=start, end=end)
            events.append(fs.event("invoice.paid", obj, created=t))
        elif kind == "customer":
            obj = fs.shape("customer", id=customer, email="x@example.com", metadata={})
            events.append(fs.event("customer.updated", obj, created=t))
        else:
            unknown = dict(price, id="price_unknown_" + sub_id, metadata={})
            obj = fs.subscription(sub_id, customer, unknown, start=start, end=end)
            events.append(fs.event("customer.subscription.updated", obj, created=t))
    return events


def interleave(rng: random.Random, streams: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The streams merged in a random order that keeps each stream's own order."""
    queues = [list(s) for s in streams if s]
    merged: list[dict[str, Any]] = []
    while queues:
        q = rng.choice(queues)
        merged.append(q.pop(0))
        if not q:
            queues.remove(q)
    return merged


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_batches_end_in_the_state_of_one_delivery_per_call(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, dsn: str, seed: int
) -> None:
    rng = random.Random(seed)
    found = await tenants(client, auth, tollhouse, 7)
    t0 = int(time.time()) - 5000
    start, end = b.period()
    subs = [{c: fs.new_id("sub") for c in t.customers} for t in found]
    events = interleave(rng, [scenario(rng, t, t0, s) for t, s in zip(found, subs, strict=True)])
    cuts = sorted(rng.sample(range(1, len(events)), 2))
    calls = [events[: cuts[0]], events[cuts[0] : cuts[1]], events[cuts[1] :]]
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL track_functions = 'all'")
        conn.execute("SET LOCAL ROLE tollhouse_service")
        # First, alone: half the tenants on pro (its overdraft allows a debt), then some of
        # each period's allowance used, all of it and more (a debt) for some.
        for n, (t, s) in enumerate(zip(found, subs, strict=True)):
            customer = t.customers[0]
            if n % 2 == 0:
                receive(
                    conn, [subscribed(customer, (start, end), sub_id=s[customer], created=t0 - 100)]
                )
            (balance,) = conn.execute(
                "SELECT balance FROM tollhouse.credit_accounts WHERE tenant_id = %s",
                (t.tenant_id,),
            ).fetchone() or (100,)
            used = rng.choice([10, balance // 2, balance, balance + 60 if n % 2 == 0 else 1])
            conn.execute(
                "SELECT tollhouse.credit_debit_v1(%s, NULL, %s, %s, NULL, 'test', '{}'::jsonb)",
                (t.tenant_id, used, f"turn-{seed}-{n}"),
            )
        (debts,) = conn.execute(
            "SELECT count(*) FROM tollhouse.credit_accounts WHERE tenant_id = ANY (%s)"
            " AND balance < 0",
            ([t.tenant_id for t in found],),
        ).fetchone() or (0,)
        assert debts > 0
        # Accounts with upkeep due at the move: a period that ended (its plan grants due), a
        # promotion past its expiry. A plan change makes the upkeep first.
        conn.execute("RESET ROLE")
        for n, t in enumerate(found):
            lapsed = LAPSED_PERIOD if n % 3 == 1 else LAPSED_PROMO if n % 3 == 2 else ""
            for statement in filter(str.strip, lapsed.split(";")):
                conn.execute(statement, {"t": t.tenant_id, "id": f"promo-{seed}-{n}"})
        conn.execute("SET LOCAL ROLE tollhouse_service")
        conn.execute("SAVEPOINT before")
        alone = [receive(conn, [e])[0] for e in events]
        states_alone = [conn.execute(STATE, {"t": t.tenant_id}).fetchone() for t in found]
        conn.execute("ROLLBACK TO SAVEPOINT before")
        calls_before = function_calls(conn)
        batched = [row for call in calls for row in receive(conn, call)]
        calls_after = function_calls(conn)
        states_batched = [conn.execute(STATE, {"t": t.tenant_id}).fetchone() for t in found]
        conn.rollback()

    def delta(name: str) -> int:
        return calls_after.get(name, 0) - calls_before.get(name, 0)

    assert batched == alone
    assert {status for _, status, _ in alone} >= {"processed", "failed"}
    for t, one, many in zip(found, states_alone, states_batched, strict=True):
        assert many == one, t
    # The batches moved plans set-wise, never one tenant at a time.
    assert delta("billing_sync_plans_v1") >= 1
    assert delta("credit_change_plan_v1") == 0


async def test_a_tenants_later_event_sees_its_deferred_move(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, dsn: str
) -> None:
    """A subscription moves the tenant to pro; its paid starter invoice, in the same batch,
    grants starter's allowance on top of that move, then moves back to pro."""
    (t,) = [x for x in await tenants(client, auth, tollhouse, 1)]
    customer = t.customers[0]
    start, end = b.period()
    starter = b.PRICES[b.STARTER]
    invoice = fs.invoice("in_later", customer, "sub_later", starter, start=start, end=end)
    now = int(time.time())
    events = [
        subscribed(customer, (start, end), sub_id="sub_later", created=now - 10),
        fs.event("invoice.paid", invoice, created=now - 5),
    ]
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL ROLE tollhouse_service")
        conn.execute("SAVEPOINT before")
        for e in events:
            receive(conn, [e])
        one = conn.execute(STATE, {"t": t.tenant_id}).fetchone()
        conn.execute("ROLLBACK TO SAVEPOINT before")
        receive(conn, events)
        many = conn.execute(STATE, {"t": t.tenant_id}).fetchone()
        conn.rollback()
    assert one is not None and many == one
    assert one[0].startswith("(pro,")
    assert "grant.plan" in one[2][-1] and "billing_period" in str(one[2])


BREAK_MOVES = """
CREATE FUNCTION public.refuse_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.tenant_id = '{tenant}' AND NEW.plan IS DISTINCT FROM OLD.plan THEN
        RAISE EXCEPTION 'moves of {tenant} refused';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_move BEFORE UPDATE ON tollhouse.credit_accounts
FOR EACH ROW EXECUTE FUNCTION public.refuse_move();
"""


async def test_a_failing_deferred_move_fails_the_call_and_alone_each_gets_its_outcome(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, dsn: str
) -> None:
    bad, good = await tenants(client, auth, tollhouse, 2)
    period = b.period()
    events = [
        subscribed(t.customers[0], period, sub_id=f"sub_fail_{n}")
        for n, t in enumerate([good, bad, good])
    ]
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(BREAK_MOVES.format(tenant=bad.tenant_id))

    async def stored() -> int:
        async with tollhouse.db.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM tollhouse.billing_events WHERE stripe_event_id = ANY (%s)",
                ([e["id"] for e in events],),
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    # One call: the deferred move fails after the events were applied; nothing stays.
    with psycopg.connect(dsn) as admin:
        admin.execute("SET LOCAL ROLE tollhouse_service")
        with pytest.raises(psycopg.errors.RaiseException):
            receive(admin, events[:2])
    assert await stored() == 0

    # Through the service: group commit sends the deliveries again alone.
    delivered = await asyncio.gather(
        *(tollhouse.billing.receiver.submit(i) for i in incoming(events))
    )
    assert [d.status for d in delivered] == ["processed", "failed", "processed"]
    assert "refused" in (delivered[1].error or "")
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT tenant_id, plan FROM tollhouse.credit_accounts WHERE tenant_id = ANY (%s)",
            ([bad.tenant_id, good.tenant_id],),
        )
        plans = dict(await cur.fetchall())
    assert plans.get(bad.tenant_id, "free") == "free"  # the account made by the move is gone too
    assert plans[good.tenant_id] == "pro"


async def test_the_setting_is_cleared_when_the_call_returns(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, dsn: str
) -> None:
    """Later work in the same transaction (the unparking, done in Python), or in the
    connection's next one, moves at once."""
    (t,) = await tenants(client, auth, tollhouse, 1)
    events = [
        subscribed(t.customers[0], b.period(), sub_id="sub_clear"),
        fs.event("customer.updated", fs.shape("customer", id=t.customers[0], metadata={})),
    ]
    read = "SELECT current_setting('tollhouse.deferred_plan_syncs', true)"
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL ROLE tollhouse_service")
        receive(conn, events)
        setting = conn.execute(read).fetchone()
        conn.commit()
        after = conn.execute(read).fetchone()  # the connection's next transaction
        conn.rollback()
        # A subtransaction that listed a tenant and then failed takes it off the list.
        conn.execute("SELECT set_config('tollhouse.deferred_plan_syncs', ',', true)")
        conn.execute("SAVEPOINT event")
        conn.execute("SELECT tollhouse.billing_sync_plan_v1(%s)", (t.tenant_id,))
        listed = conn.execute(read).fetchone()
        conn.execute("ROLLBACK TO SAVEPOINT event")
        unlisted = conn.execute(read).fetchone()
        conn.rollback()
    assert setting == ("",)
    assert after in {("",), (None,)}
    assert listed == (f",{t.tenant_id},",)
    assert unlisted == (",",)


async def test_concurrent_batches_and_debits_keep_plans_and_conservation(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    """Tenants with two customers each, whose subscriptions change plan in every round from
    both customers at once (group commit may put them in two concurrent calls), while debits
    of the same tenants run: every account ends on its effective plan, and every balance is
    its ledger and its grants."""
    made = await tenants(client, auth, tollhouse, 6, all_with_two=True)
    period = b.period()
    rng = random.Random(7)
    t0 = int(time.time()) - 1000

    def change(customer: str, n: int) -> dict[str, Any]:
        price = rng.choice([b.PRO, b.STARTER])
        updated = "customer.subscription.updated"
        return subscribed(customer, period, price, created=t0 + n, type_=updated)

    async def debits() -> None:
        for _ in range(20):
            await asyncio.gather(
                *(
                    tollhouse.credits.debit_alone(
                        DebitRequest(amount=1, turn_id=uuid.uuid4().hex, user_id=c.user_id)
                    )
                    for c in made
                )
            )

    async def webhooks() -> None:
        for n in range(10):
            events = [change(t.customers[0], 2 * n) for t in made]
            events += [change(t.customers[1], 2 * n + rng.randint(0, 1)) for t in made]
            rng.shuffle(events)
            answers = await asyncio.gather(*(b.ok(client, e) for e in events))
            assert {a["status"] for a in answers} == {"processed"}

    receiver = tollhouse.billing.receiver
    calls, carried = receiver.batches, receiver.requests
    await asyncio.gather(webhooks(), debits())
    assert receiver.requests - carried > receiver.batches - calls  # some calls carried several
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT a.tenant_id, a.plan, tollhouse.billing_effective_plan_v1(a.tenant_id)"
            " FROM tollhouse.credit_accounts a WHERE a.tenant_id = ANY (%s)",
            ([c.tenant_id for c in made],),
        )
        rows = await cur.fetchall()
        assert len(rows) == len(made)
        assert [(t, plan) for t, plan, _ in rows] == [(t, effective) for t, _, effective in rows]
        assert await conservation_problems(conn) == []


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("first_account", [True, False])
async def test_a_move_reads_the_effective_plan_after_the_lock(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    tollhouse: Tollhouse,
    dsn: str,
    batched: bool,
    first_account: bool,
) -> None:
    """Two calls move one tenant (two customers, one subscription each) at once, in batches
    (the deferred move) or alone (billing_sync_plan_v1). The second waits for the first's
    lock on the account (an account made before, or the first one ever made); it must then
    see the first's newer subscription, so the tenant stays on the newer one's plan."""
    (t,) = await tenants(client, auth, tollhouse, 1)
    async with tollhouse.db.connection() as conn:
        if not first_account:
            await conn.execute("SELECT tollhouse.credit_account_v1(%s)", (t.tenant_id,))
        cur = await conn.execute(
            "SELECT count(*) FROM tollhouse.credit_accounts WHERE tenant_id = %s", (t.tenant_id,)
        )
        assert await cur.fetchone() == (0 if first_account else 1,)
    first, second = t.customers
    period = b.period()
    now = int(time.time())

    def batch(customer: str, price: str, created: int) -> list[dict[str, Any]]:
        events = [subscribed(customer, period, price, created=created)]
        if batched:  # a batch: more than one delivery
            events.append(fs.event("tollhouse.test.ignored", {"id": "x"}))
        return events

    newer = batch(first, b.PRO, now - 10)
    older = batch(second, b.STARTER, now - 20)
    with (
        psycopg.connect(dsn) as holder,
        psycopg.connect(dsn) as waiter,
        psycopg.connect(dsn, autocommit=True) as watcher,
    ):
        holder.execute("SET LOCAL ROLE tollhouse_service")
        receive(holder, newer)  # moved to pro; the account stays locked until the commit
        pid = waiter.info.backend_pid
        results: list[Any] = []

        def wait() -> None:
            try:
                waiter.execute("SET LOCAL ROLE tollhouse_service")
                results.append(receive(waiter, older))
                waiter.commit()
            except Exception as exc:  # reported below
                results.append(exc)

        done = threading.Thread(target=wait)
        done.start()
        try:
            for _ in range(500):
                row = watcher.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
                if row and row[0] == "Lock":
                    break
                time.sleep(0.01)
            else:
                raise AssertionError(f"the second call never waited: {row} {results}")
        finally:
            holder.commit()
            done.join(timeout=30)
    statuses = ["processed", "ignored"] if batched else ["processed"]
    assert [[status for _, status, _ in r] for r in results] == [statuses], results
    async with tollhouse.db.connection() as conn:
        cur = await conn.execute(
            "SELECT plan, tollhouse.billing_effective_plan_v1(tenant_id)"
            " FROM tollhouse.credit_accounts WHERE tenant_id = %s",
            (t.tenant_id,),
        )
        assert await cur.fetchone() == ("pro", "pro")
        assert await conservation_problems(conn, t.tenant_id) == []


async def test_deliveries_of_no_listed_tenant_leave_the_moves_to_the_end(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse, dsn: str
) -> None:
    """Between two tenants' plan changes, an event of no customer, one of an unknown
    customer (parked) and one of a third tenant: the two moves are made once, together."""
    one, two, three = await tenants(client, auth, tollhouse, 3)
    period = b.period()
    events = [
        subscribed(one.customers[0], period),
        fs.event("tollhouse.test.ignored", {"id": "x"}),
        subscribed("cus_nobody", period),
        fs.event("customer.updated", fs.shape("customer", id=three.customers[0], metadata={})),
        subscribed(two.customers[0], period),
    ]
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL track_functions = 'all'")
        conn.execute("SET LOCAL ROLE tollhouse_service")
        statuses = [status for _, status, _ in receive(conn, events)]
        calls = function_calls(conn)
        plans = conn.execute(
            "SELECT plan FROM tollhouse.credit_accounts WHERE tenant_id = ANY (%s)",
            ([one.tenant_id, two.tenant_id],),
        ).fetchall()
        conn.rollback()
    assert statuses == ["processed", "ignored", "parked", "processed", "processed"]
    assert calls.get("billing_sync_plans_v1") == 1
    assert plans == [("pro",), ("pro",)]
