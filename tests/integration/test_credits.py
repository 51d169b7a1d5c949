"""The credits ledger on a real database: RELIABILITY L-01..L-05, L-07, L-09, L-11, L-12,
with a naive read-then-write control for each concurrency rule."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tollhouse import errors
from tollhouse.app import Tollhouse
from tollhouse.credits import DebitRequest, DebitResult, conservation_problems
from tollhouse.identity import IdentityConfig


@pytest.fixture(autouse=True)
async def _conservation(tollhouse: Tollhouse) -> AsyncIterator[None]:
    """L-01 after every test: balances equal their ledger and their live grants."""
    yield
    async with tollhouse.db.connection() as conn:
        assert await conservation_problems(conn) == []


@pytest.fixture
async def no_allowance(tollhouse: Tollhouse) -> None:
    """Plans without a monthly allowance, so a test funds accounts itself."""
    for name in ("free", "starter", "pro", "power"):
        await tollhouse.credits.set_plan(name, monthly_credits=0, daily_cap=None, overdraft_limit=0)


async def _payer(tollhouse: Tollhouse, funds: int = 0) -> uuid.UUID:
    user = await tollhouse.users.create(email=f"{uuid.uuid4().hex[:12]}@example.com")
    if funds:
        await tollhouse.credits.grant(amount=funds, source="purchase", user_id=user.id)
    return user.id


def _debit(user: uuid.UUID, amount: int, turn: str | None = None) -> DebitRequest:
    return DebitRequest(amount=amount, turn_id=turn or uuid.uuid4().hex, user_id=user)


async def _ledger_debits(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM tollhouse.credit_ledger WHERE kind = 'debit'"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_first_use_grants_the_plan_allowance(tollhouse: Tollhouse) -> None:
    user = await _payer(tollhouse)
    result = await tollhouse.credits.debit(_debit(user, 10))
    assert (result.status, result.balance_after) == ("applied", 90)  # free: 100 a month
    balance = await tollhouse.credits.balance(user_id=user)
    assert (balance.plan, balance.balance, balance.daily_used, balance.daily_cap) == (
        "free",
        90,
        10,
        25,
    )
    entries, _ = await tollhouse.credits.ledger(user_id=user)
    assert [(x.kind, x.delta, x.balance_after) for x in entries] == [
        ("debit", -10, 90),
        ("grant", 100, 100),
    ]


@pytest.mark.parametrize("coalesced", [True, False])
async def test_storm_on_one_account_never_crosses_the_floor(
    dsn: str, tollhouse: Tollhouse, no_allowance: None, coalesced: bool
) -> None:
    """L-02: 2,000 debits of 1..10 from 64 tasks against 6,000 credits, through group
    commit and one transaction per debit."""
    user = await _payer(tollhouse, funds=6000)
    rng = random.Random(2)
    amounts = [rng.randint(1, 10) for _ in range(2000)]
    sem = asyncio.Semaphore(64)

    debit = tollhouse.credits.debit if coalesced else tollhouse.credits.debit_alone

    async def one(amount: int) -> DebitResult:
        async with sem:
            return await debit(_debit(user, amount))

    results = await asyncio.gather(*(one(a) for a in amounts))
    accepted = [r.amount for r in results if r.status == "applied"]
    rejected = [r.amount for r in results if r.status == "rejected"]
    assert {r.code for r in results if r.status == "rejected"} <= {"insufficient_credits"}
    final = (await tollhouse.credits.balance(user_id=user)).balance
    assert final >= 0
    assert final == 6000 - sum(accepted)
    assert await _ledger_debits(dsn) == len(accepted)
    assert all(amount > final for amount in rejected)  # no false rejections
    if coalesced:
        assert tollhouse.credits.batcher.batches < tollhouse.credits.batcher.requests


async def test_control_read_then_write_debits_break_the_floor(dsn: str) -> None:
    """The naive debit the storm test would catch: read the balance, then write it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.naive (id int PRIMARY KEY, balance bigint NOT NULL)")
        conn.execute("INSERT INTO public.naive VALUES (1, 300)")
    barrier = asyncio.Barrier(64)

    async def naive(amount: int) -> bool:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT balance FROM public.naive WHERE id = 1")
            row = await cur.fetchone()
            assert row is not None
            await barrier.wait()
            if row[0] < amount:
                return False
            await conn.execute(
                "UPDATE public.naive SET balance = %s WHERE id = 1", (row[0] - amount,)
            )
            return True

    accepted = await asyncio.gather(*(naive(10) for _ in range(64)))
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT balance FROM public.naive").fetchone()
    assert row is not None
    # 64 debits of 10 were accepted against 300, yet the balance says one happened.
    assert sum(accepted) * 10 > 300 and row[0] != 300 - 10 * sum(accepted)


async def test_concurrent_duplicates_debit_once_with_identical_answers(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """L-03: 200 turns, each sent 8 times at once."""
    user = await _payer(tollhouse, funds=100_000)
    turns = [uuid.uuid4().hex for _ in range(200)]
    requests = [_debit(user, 5, turn) for turn in turns for _ in range(8)]
    random.Random(3).shuffle(requests)
    results = await asyncio.gather(*(tollhouse.credits.debit(r) for r in requests))
    by_turn: dict[str, set[tuple[object, ...]]] = {}
    for request, result in zip(requests, results, strict=True):
        by_turn.setdefault(request.turn_id, set()).add(
            (result.ledger_id, result.amount, result.balance_after, result.status)
        )
    assert all(len(answers) == 1 for answers in by_turn.values())
    assert sum(not r.replayed for r in results) == 200
    assert await _ledger_debits(dsn) == 200
    before = (await tollhouse.credits.balance(user_id=user)).balance
    conflict = await tollhouse.credits.debit(_debit(user, 6, turns[0]))
    assert (conflict.status, conflict.code) == ("rejected", "idempotency_conflict")
    assert (await tollhouse.credits.balance(user_id=user)).balance == before


async def test_outcomes_are_sticky_rejections_included(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """L-04: a rejected turn stays rejected after a top-up; an applied one replays."""
    user = await _payer(tollhouse, funds=10)
    first = await tollhouse.credits.debit(_debit(user, 50, "turn-1"))
    assert (first.status, first.code) == ("rejected", "insufficient_credits")
    await tollhouse.credits.grant(amount=1000, source="purchase", user_id=user)
    retries = [await tollhouse.credits.debit(_debit(user, 50, "turn-1")) for _ in range(20)]
    assert all(
        (r.status, r.code, r.replayed) == ("rejected", "insufficient_credits", True)
        for r in retries
    )
    assert await _ledger_debits(dsn) == 0
    ok = await tollhouse.credits.debit(_debit(user, 50, "turn-2"))
    again = await tollhouse.credits.debit(_debit(user, 50, "turn-2"))
    assert again.replayed and (again.ledger_id, again.balance_after) == (
        ok.ledger_id,
        ok.balance_after,
    )


async def test_a_debit_spans_grants_in_priority_then_expiry_order(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """L-05: priority 10, then the sooner-expiring of the priority-5 grants."""
    user = await _payer(tollhouse)
    now = datetime.now(UTC)
    a = await tollhouse.credits.grant(
        amount=100, source="promo", user_id=user, priority=10, expires_at=now + timedelta(days=1)
    )
    b = await tollhouse.credits.grant(
        amount=100, source="promo", user_id=user, priority=5, expires_at=now + timedelta(days=2)
    )
    c = await tollhouse.credits.grant(
        amount=100, source="promo", user_id=user, priority=5, expires_at=now + timedelta(days=1)
    )
    result = await tollhouse.credits.debit(_debit(user, 250))
    with psycopg.connect(dsn) as conn:
        splits: dict[uuid.UUID, int] = dict(
            conn.execute(
                "SELECT grant_id, amount FROM tollhouse.credit_ledger_splits WHERE ledger_id = %s",
                (result.ledger_id,),
            ).fetchall()
        )
    assert splits == {a.grant_id: 100, c.grant_id: 100, b.grant_id: 50}


async def test_a_failure_half_way_leaves_nothing(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """L-05: a fault after the second grant update rolls the whole debit back."""
    user = await _payer(tollhouse)
    for priority in (3, 2, 1):
        await tollhouse.credits.grant(amount=100, source="promo", user_id=user, priority=priority)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE public.fault_counter")
        conn.execute(
            "CREATE FUNCTION public.fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF nextval('public.fault_counter') = 2 THEN RAISE EXCEPTION 'injected fault';"
            " END IF; RETURN NEW; END $$"
        )
        conn.execute("GRANT USAGE ON SEQUENCE public.fault_counter TO tollhouse_service")
        conn.execute(
            "CREATE TRIGGER fault AFTER UPDATE ON tollhouse.credit_grants"
            " FOR EACH ROW EXECUTE FUNCTION public.fault()"
        )
    with pytest.raises(errors.DatabaseError):
        await tollhouse.credits.debit_alone(_debit(user, 250))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TRIGGER fault ON tollhouse.credit_grants")
        remaining = conn.execute(
            "SELECT array_agg(remaining ORDER BY priority DESC) FROM tollhouse.credit_grants"
        ).fetchone()
    assert remaining == ([100, 100, 100],)
    assert await _ledger_debits(dsn) == 0


async def test_daily_cap_holds_under_concurrency(tollhouse: Tollhouse, no_allowance: None) -> None:
    """L-07: cap 100; 64 tasks send 10 debits of 7 each: exactly 98 accepted."""
    await tollhouse.credits.set_plan("free", monthly_credits=0, daily_cap=100, overdraft_limit=0)
    user = await _payer(tollhouse, funds=10_000)
    requests = [_debit(user, 7) for _ in range(640)]
    results = await asyncio.gather(*(tollhouse.credits.debit(r) for r in requests))
    assert sum(r.amount for r in results if r.status == "applied") == 98
    assert {r.code for r in results if r.status == "rejected"} == {"daily_cap_exceeded"}
    balance = await tollhouse.credits.balance(user_id=user)
    assert balance.daily_used == 98


async def test_control_sum_then_insert_cap_is_exceeded(dsn: str) -> None:
    """L-07 mutation check: the naive SUM-then-INSERT cap lets concurrent debits through."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.naive_usage (amount int NOT NULL)")
    barrier = asyncio.Barrier(32)

    async def naive() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute("SELECT coalesce(sum(amount), 0) FROM public.naive_usage")
            row = await cur.fetchone()
            assert row is not None
            await barrier.wait()
            if row[0] + 7 <= 100:
                await conn.execute("INSERT INTO public.naive_usage VALUES (7)")
            await conn.commit()

    await asyncio.gather(*(naive() for _ in range(32)))
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT sum(amount) FROM public.naive_usage").fetchone()
    assert row is not None and row[0] > 100


async def test_overdraft_floor_and_debt_repaid_from_the_next_grant(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """L-09: overdraft limit 50; the storm never goes below -50; the debt is repaid first."""
    await tollhouse.credits.set_plan("free", monthly_credits=0, daily_cap=None, overdraft_limit=50)
    user = await _payer(tollhouse, funds=1000)
    rng = random.Random(9)
    results = await asyncio.gather(
        *(tollhouse.credits.debit(_debit(user, rng.randint(1, 10))) for _ in range(400))
    )
    balances = [r.balance_after for r in results if r.balance_after is not None]
    assert min(balances) >= -50
    final = await tollhouse.credits.balance(user_id=user)
    assert final.balance < 0 and final.overdraft == -final.balance
    grant = await tollhouse.credits.grant(amount=100, source="purchase", user_id=user)
    assert grant.balance_after == final.balance + 100
    after = await tollhouse.credits.balance(user_id=user)
    assert [g.remaining for g in after.grants] == [100 + final.balance]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET ROLE tollhouse_service")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE tollhouse.credit_accounts SET balance = -51")


async def test_the_ledger_is_append_only(dsn: str, tollhouse: Tollhouse) -> None:
    """L-11: the service role cannot change or delete ledger rows."""
    user = await _payer(tollhouse)
    await tollhouse.credits.debit(_debit(user, 1))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET ROLE tollhouse_service")
        for statement in (
            "UPDATE tollhouse.credit_ledger SET delta = 0",
            "DELETE FROM tollhouse.credit_ledger",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


@pytest.mark.parametrize("amount", [0, -5, 10**16])
async def test_amounts_out_of_range_are_refused(tollhouse: Tollhouse, amount: int) -> None:
    """L-12 at the library edge (the HTTP edge also refuses floats)."""
    user = await _payer(tollhouse)
    with pytest.raises(errors.InvalidRequest):
        await tollhouse.credits.debit(_debit(user, amount))


async def test_unknown_payer_and_deleted_user(tollhouse: Tollhouse) -> None:
    result = await tollhouse.credits.debit(_debit(uuid.uuid4(), 1))
    assert (result.status, result.code) == ("rejected", "not_found")
    user = await _payer(tollhouse)
    await tollhouse.users.delete(user)
    gone = await tollhouse.credits.debit(_debit(user, 1))
    assert gone.code == "not_found"


async def test_expired_grants_are_expired_once(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    user = await _payer(tollhouse)
    soon = datetime.now(UTC) + timedelta(seconds=1)
    await tollhouse.credits.grant(amount=30, source="promo", user_id=user, expires_at=soon)
    await tollhouse.credits.grant(amount=20, source="purchase", user_id=user)
    await asyncio.sleep(1.2)
    await asyncio.gather(*(tollhouse.credits.balance(user_id=user) for _ in range(5)))
    balance = await tollhouse.credits.balance(user_id=user)
    assert balance.balance == 20
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM tollhouse.credit_ledger WHERE kind = 'expiry'"
        ).fetchone()
    assert row == (1,)
    rejected = await tollhouse.credits.debit(_debit(user, 25))
    assert rejected.code == "insufficient_credits"


async def test_grants_are_idempotent_per_source_id(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    user = await _payer(tollhouse)
    first = await tollhouse.credits.grant(
        amount=40, source="purchase", user_id=user, source_id="in_123"
    )
    results = await asyncio.gather(
        *(
            tollhouse.credits.grant(amount=40, source="purchase", user_id=user, source_id="in_123")
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    assert all(not isinstance(r, BaseException) and r.grant_id == first.grant_id for r in results)
    assert (await tollhouse.credits.balance(user_id=user)).balance == 40
    with pytest.raises(errors.IdempotencyConflict):
        await tollhouse.credits.grant(
            amount=41, source="purchase", user_id=user, source_id="in_123"
        )


async def test_group_commit_calls_go_on_the_lanes_own_connections(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    """Batch calls stay on `TOLLHOUSE_CREDIT_LANES` warm connections, not the main pool's."""
    users = [await _payer(tollhouse, funds=1000) for _ in range(8)]
    credits = tollhouse.credits
    lanes_before = credits.lane_db.stats().get("requests_num", 0)
    main_before = tollhouse.db.stats().get("requests_num", 0)
    batches_before = credits.batcher.batches
    sem = asyncio.Semaphore(48)

    async def one(n: int) -> DebitResult:
        async with sem:
            return await credits.debit(_debit(users[n % 8], 1))

    results = await asyncio.gather(*(one(n) for n in range(400)))
    assert {r.status for r in results} == {"applied"}
    calls = credits.batcher.batches - batches_before
    assert calls > 2
    assert credits.lane_db.stats().get("requests_num", 0) - lanes_before == calls
    assert tollhouse.db.stats().get("requests_num", 0) == main_before
    assert credits.lane_db.stats()["pool_size"] <= 2
    # A debit alone (no group commit) goes on the main pool.
    await credits.debit_alone(_debit(users[0], 1))
    assert tollhouse.db.stats().get("requests_num", 0) == main_before + 1
    assert credits.lane_db.stats().get("requests_num", 0) - lanes_before == calls


async def test_a_lone_debit_goes_alone(tollhouse: Tollhouse) -> None:
    user = await _payer(tollhouse)
    batcher = tollhouse.credits.batcher
    before = (batcher.batches, batcher.requests)
    await tollhouse.credits.debit(_debit(user, 1))
    assert (batcher.batches - before[0], batcher.requests - before[1]) == (1, 1)


async def test_end_users_read_only_their_own_tenants_credits(
    tollhouse: Tollhouse,
) -> None:
    a = await _payer(tollhouse)
    b = await _payer(tollhouse)
    for user in (a, b):
        await tollhouse.credits.debit(_debit(user, 1))
    async with tollhouse.db.as_end_user(a) as conn:
        for table in ("credit_accounts", "credit_grants", "credit_ledger"):
            cur = await conn.execute(f"SELECT count(DISTINCT tenant_id) FROM tollhouse.{table}")
            assert await cur.fetchone() == (1,), table
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("UPDATE tollhouse.credit_accounts SET balance = 1000000")


# --- reservations, refunds, usage counters, sweep --------------------------------------------


async def test_reserve_then_commit_less_returns_the_rest(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    user = await _payer(tollhouse, funds=100)
    held = await tollhouse.credits.reserve(amount=60, turn_id="stream-1", user_id=user)
    assert (held.status, held.balance_after) == ("pending", 40)  # available after the hold
    balance = await tollhouse.credits.balance(user_id=user)
    assert (balance.balance, balance.available) == (100, 40)
    blocked = await tollhouse.credits.debit(_debit(user, 50))
    assert blocked.code == "insufficient_credits"  # the hold counts
    done = await tollhouse.credits.commit(turn_id="stream-1", amount=25, user_id=user)
    assert (done.status, done.amount, done.balance_after) == ("applied", 25, 75)
    again = await tollhouse.credits.commit(turn_id="stream-1", amount=25, user_id=user)
    assert again.replayed and again.ledger_id == done.ledger_id
    late = await tollhouse.credits.release(turn_id="stream-1", user_id=user)
    assert late.code == "reservation_committed"
    too_much = await tollhouse.credits.reserve(amount=10, turn_id="stream-2", user_id=user)
    over = await tollhouse.credits.commit(turn_id="stream-2", amount=11, user_id=user)
    assert (too_much.status, over.code) == ("pending", "commit_exceeds_reservation")


async def test_exactly_one_of_concurrent_commit_and_release_wins(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    """L-10: 50 races of commit against release on one hold each."""
    user = await _payer(tollhouse, funds=10_000)
    for i in range(50):
        await tollhouse.credits.reserve(amount=10, turn_id=f"race-{i}", user_id=user)
    outcomes = await asyncio.gather(
        *(
            call
            for i in range(50)
            for call in (
                tollhouse.credits.commit(turn_id=f"race-{i}", amount=7, user_id=user),
                tollhouse.credits.release(turn_id=f"race-{i}", user_id=user),
            )
        )
    )
    for i in range(50):
        commit, release = outcomes[2 * i], outcomes[2 * i + 1]
        winners = [o for o in (commit, release) if o.status in ("applied", "released")]
        assert len(winners) == 1, (commit, release)
    balance = await tollhouse.credits.balance(user_id=user)
    committed = sum(1 for i in range(50) if outcomes[2 * i].status == "applied")
    assert balance.balance == 10_000 - 7 * committed
    assert balance.available == balance.balance  # no hold left behind


async def test_an_expired_hold_gives_its_credits_back(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    user = await _payer(tollhouse, funds=100)
    await tollhouse.credits.reserve(amount=80, turn_id="slow", user_id=user, ttl_seconds=1)
    assert (await tollhouse.credits.balance(user_id=user)).available == 20
    await asyncio.sleep(1.2)
    assert await tollhouse.credits.sweep() == 1
    assert (await tollhouse.credits.balance(user_id=user)).available == 100
    late = await tollhouse.credits.commit(turn_id="slow", amount=10, user_id=user)
    assert late.code == "reservation_expired"
    assert await tollhouse.credits.sweep() == 0


async def test_refunds_are_idempotent_totals(tollhouse: Tollhouse, no_allowance: None) -> None:
    user = await _payer(tollhouse, funds=100)
    debit = await tollhouse.credits.debit(_debit(user, 40))
    assert debit.ledger_id is not None
    _, refunded, balance = await tollhouse.credits.refund(debit.ledger_id, total=10)
    assert (refunded, balance) == (10, 70)
    _, refunded, balance = await tollhouse.credits.refund(debit.ledger_id, total=10)
    assert (refunded, balance) == (10, 70)  # the same total again: nothing more
    _, refunded, balance = await tollhouse.credits.refund(debit.ledger_id)
    assert (refunded, balance) == (40, 100)
    with pytest.raises(errors.RefundExceedsDebit):
        await tollhouse.credits.refund(debit.ledger_id, total=41)
    with pytest.raises(errors.LedgerEntryNotFound):
        await tollhouse.credits.refund(uuid.uuid4())


async def test_usage_counters_check_and_count_at_once(tollhouse: Tollhouse) -> None:
    user = await tollhouse.users.create(email="usage@example.com")
    tenant = user.personal_tenant_id
    assert tenant is not None
    results = await asyncio.gather(
        *(
            tollhouse.credits.usage_increment(
                tenant, "api_calls", amount=1, limit=25, window_seconds=3600
            )
            for _ in range(60)
        )
    )
    assert sum(allowed for allowed, _ in results) == 25
    assert max(used for _, used in results) == 25


# --- found in review ----------------------------------------------------------------------


async def test_a_late_transaction_never_rewinds_the_day(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """A debit whose transaction started before midnight but got the lock after it must
    count against the new day, not wipe it (seen as 196 accepted under a cap of 100)."""
    await tollhouse.credits.set_plan("free", monthly_credits=0, daily_cap=100, overdraft_limit=0)
    user = await _payer(tollhouse, funds=1000)
    await tollhouse.credits.debit(_debit(user, 1))
    with psycopg.connect(dsn, autocommit=True) as conn:
        # As if another transaction, already on tomorrow, had used 90.
        conn.execute(
            "UPDATE tollhouse.credit_accounts SET day_start = day_start + 1, daily_used = 90"
        )
    late = await tollhouse.credits.debit(_debit(user, 20))
    assert late.code == "daily_cap_exceeded"
    ok = await tollhouse.credits.debit(_debit(user, 10))
    assert ok.status == "applied"


async def test_a_turn_id_belongs_to_one_payer(tollhouse: Tollhouse, no_allowance: None) -> None:
    a = await _payer(tollhouse, funds=100)
    b = await _payer(tollhouse, funds=100)
    await tollhouse.credits.debit(_debit(a, 5, "shared-turn"))
    other = await tollhouse.credits.debit(_debit(b, 5, "shared-turn"))
    assert (other.status, other.code) == ("rejected", "idempotency_conflict")
    assert (await tollhouse.credits.balance(user_id=b)).balance == 100


async def test_a_reserved_turn_is_debited_only_by_its_commit(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    user = await _payer(tollhouse, funds=100)
    await tollhouse.credits.reserve(amount=60, turn_id="held", user_id=user)
    plain = await tollhouse.credits.debit(_debit(user, 50, "held"))
    assert plain.code == "idempotency_conflict"
    await tollhouse.credits.debit(_debit(user, 5, "spent"))
    reserve = await tollhouse.credits.reserve(amount=5, turn_id="spent", user_id=user)
    assert reserve.code == "idempotency_conflict"
    done = await tollhouse.credits.commit(turn_id="held", amount=30, user_id=user)
    assert (done.status, done.balance_after) == ("applied", 65)


async def test_a_commit_the_balance_cannot_cover_leaves_the_hold_pending(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """The credits under a hold expired: the commit is refused, nothing is burned, and a
    commit after a top-up goes through."""
    user = await _payer(tollhouse)
    soon = datetime.now(UTC) + timedelta(seconds=1)
    await tollhouse.credits.grant(amount=50, source="promo", user_id=user, expires_at=soon)
    await tollhouse.credits.reserve(amount=40, turn_id="stream", user_id=user)
    await asyncio.sleep(1.2)
    refused = await tollhouse.credits.commit(turn_id="stream", amount=30, user_id=user)
    assert refused.code == "insufficient_credits"
    await tollhouse.credits.grant(amount=100, source="purchase", user_id=user)
    done = await tollhouse.credits.commit(turn_id="stream", amount=30, user_id=user)
    assert (done.status, done.balance_after) == ("applied", 70)


async def test_a_new_period_takes_the_plans_current_limits_and_keeps_its_anchor(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    user = await _payer(tollhouse, funds=1000)
    await tollhouse.credits.debit(_debit(user, 1))
    await tollhouse.credits.set_plan("free", monthly_credits=10, daily_cap=5, overdraft_limit=0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE tollhouse.credit_accounts SET"
            " created_at = timestamptz '2026-01-31 12:00+00',"
            " period_start = timestamptz '2026-01-31 12:00+00',"
            " period_end = timestamptz '2026-02-28 12:00+00'"
        )
    balance = await tollhouse.credits.balance(user_id=user)
    assert balance.daily_cap == 5
    assert balance.period_start <= datetime.now(UTC) < balance.period_end
    assert balance.period_start.day in (28, 29, 30, 31)  # anchored to the 31st, no drift
    capped = await tollhouse.credits.debit(_debit(user, 6))
    assert capped.code == "daily_cap_exceeded"
    assert balance.balance == 999 + 10  # the new period's allowance arrived


def _on_a_settable_clock(conn: psycopg.Connection[Any], function: str) -> str:
    """Redefine `function` in this test's database with its now() read from the setting
    `test.now`, and return its real definition (to restore it)."""
    real = conn.execute("SELECT pg_get_functiondef(%s::regprocedure)", (function,)).fetchone()
    assert real is not None
    conn.execute(
        "CREATE FUNCTION tollhouse.test_now() RETURNS timestamptz LANGUAGE sql STABLE"
        " AS $$ SELECT current_setting('test.now')::timestamptz $$"
    )
    conn.execute(str(real[0]).replace("now()", "tollhouse.test_now()"))
    return str(real[0])


async def test_a_period_ending_on_a_clamped_month_end_renews_at_once(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """An account made on Jan 31 12:00: its first period ends Feb 28 12:00 (clamped). At
    13:00 the next period, to Mar 31 12:00, has begun and its allowance is live; age() alone
    still counted 0 whole months then and wrote the ended period back until midnight.
    (credit_account_v1 runs on a settable clock here; the real one restores it.)"""
    user = await _payer(tollhouse)
    tenant = (await tollhouse.credits.balance(user_id=user)).tenant_id
    await tollhouse.credits.set_plan("free", monthly_credits=10, daily_cap=None, overdraft_limit=0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        real = _on_a_settable_clock(conn, "tollhouse.credit_account_v1(uuid)")
        conn.execute(
            "UPDATE tollhouse.credit_accounts SET created_at = '2026-01-31 12:00+00',"
            " period_start = '2026-01-31 12:00+00', period_end = '2026-02-28 12:00+00',"
            " allowance_for = '2026-01-31 12:00+00' WHERE tenant_id = %s",
            (tenant,),
        )
        seen = []
        for at in ("2026-02-28 11:00+00", "2026-02-28 13:00+00", "2026-03-01 00:01+00"):
            conn.execute("SELECT set_config('test.now', %s, false)", (at,))
            conn.execute("SELECT tollhouse.credit_account_v1(%s)", (tenant,))
            row = conn.execute(
                "SELECT period_start, period_end, balance FROM tollhouse.credit_accounts"
                " WHERE tenant_id = %s",
                (tenant,),
            ).fetchone()
            assert row is not None
            seen.append((row[0].isoformat(), row[1].isoformat(), row[2]))
        conn.execute(real)
    assert seen == [
        ("2026-01-31T12:00:00+00:00", "2026-02-28T12:00:00+00:00", 0),
        ("2026-02-28T12:00:00+00:00", "2026-03-31T12:00:00+00:00", 10),
        ("2026-02-28T12:00:00+00:00", "2026-03-31T12:00:00+00:00", 10),
    ]
    await tollhouse.credits.balance(user_id=user)  # on the real clock again, for the checks


async def test_a_refused_adjustment_is_the_answer_for_its_id_either_way(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    """-1000 below the floor is refused and replays refused; the same id then asking +1000
    is an idempotency conflict, not a grant (the refusal left no adjustment row)."""
    user = await _payer(tollhouse, funds=100)
    asked = [(-1000, "insufficient_credits"), (-1000, "insufficient_credits")]
    for amount, code in [*asked, (1000, "idempotency_conflict")]:
        result = await tollhouse.credits.adjust(
            amount=amount, adjustment_id="fix-3", note="typo", user_id=user
        )
        assert (result.status, result.code) == ("rejected", code)
    assert (await tollhouse.credits.balance(user_id=user)).balance == 100


async def test_adjustment_ids_are_each_tenants_own(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """Two tenants take with the same adjustment id, and a client's debit of turn
    `adjustment:fix-2` (sent before such turn ids were refused) does not answer the
    adjustment fix-2: a negative adjustment's turn is `adjustment:<tenant>:<id>`."""
    a, b = await _payer(tollhouse, funds=100), await _payer(tollhouse, funds=100)
    for user in (a, b):
        taken = await tollhouse.credits.adjust(
            amount=-5, adjustment_id="fix-1", note="x", user_id=user
        )
        assert (taken.status, taken.replayed, taken.balance_after) == ("applied", False, 95)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT tollhouse.credit_debit_v1(NULL, %s, 7, 'adjustment:fix-2', NULL,"
            " 'llm_usage', '{}')",
            (a,),
        )
    taken = await tollhouse.credits.adjust(amount=-7, adjustment_id="fix-2", note="x", user_id=a)
    assert (taken.status, taken.replayed, taken.balance_after) == ("applied", False, 81)
    entries, _ = await tollhouse.credits.ledger(user_id=a)
    tenant = await tollhouse.credits.tenant_of(None, a)
    assert entries[0].turn_id == f"adjustment:{tenant}:fix-2"


async def test_a_client_turn_id_may_not_look_like_an_adjustments(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    user = await _payer(tollhouse, funds=100)
    with pytest.raises(errors.TurnIdReserved):
        await tollhouse.credits.debit(_debit(user, 1, "adjustment:x"))
    with pytest.raises(errors.TurnIdReserved):
        await tollhouse.credits.debit_alone(_debit(user, 1, "adjustment:x"))
    with pytest.raises(errors.TurnIdReserved):
        await tollhouse.credits.reserve(amount=1, turn_id="adjustment:x", user_id=user)
    assert (await tollhouse.credits.debit(_debit(user, 1, "adjustments"))).status == "applied"


async def test_a_debit_made_with_an_adjustment_like_turn_before_0022_can_be_repeated(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """Such turn ids were accepted before; a client's retry gets the recorded answer."""
    user = await _payer(tollhouse, funds=100)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT tollhouse.credit_debit_v1(NULL, %s, 7, 'adjustment:old', NULL,"
            " 'llm_usage', '{}')",
            (user,),
        )
    for send in (tollhouse.credits.debit, tollhouse.credits.debit_alone):
        again = await send(_debit(user, 7, "adjustment:old"))
        assert (again.status, again.replayed, again.balance_after) == ("applied", True, 93)


async def test_an_adjustment_id_spelled_like_a_hash_is_another_id(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    user = await _payer(tollhouse, funds=100)
    long_id = "L" * 160
    first = await tollhouse.credits.adjust(amount=-5, adjustment_id=long_id, note="x", user_id=user)
    spelled = "sha256:" + hashlib.sha256(long_id.encode()).hexdigest()
    other = await tollhouse.credits.adjust(amount=-5, adjustment_id=spelled, note="x", user_id=user)
    assert (first.replayed, other.replayed) == (False, False)
    assert (other.balance_after, other.ledger_id != first.ledger_id) == (90, True)


async def test_a_commit_of_a_turn_an_adjustment_answered_keeps_the_hold(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """A hold on the turn a negative adjustment then debited (made in SQL: the service refuses
    such turn ids): its commit is refused and the hold stays pending, instead of being marked
    committed and given back with nothing charged."""
    user = await _payer(tollhouse, funds=100)
    tenant = await tollhouse.credits.tenant_of(None, user)
    turn = f"adjustment:{tenant}:z"
    with psycopg.connect(dsn, autocommit=True) as conn:
        held = conn.execute(
            "SELECT status FROM tollhouse.credit_reserve_v1(NULL, %s, 40, %s, 600, NULL)",
            (user, turn),
        ).fetchone()
        assert held == ("pending",)
    taken = await tollhouse.credits.adjust(amount=-5, adjustment_id="z", note="x", user_id=user)
    assert (taken.status, taken.balance_after) == ("applied", 95)
    refused = await tollhouse.credits.commit(turn_id=turn, amount=30, user_id=user)
    assert (refused.status, refused.code) == ("rejected", "idempotency_conflict")
    with psycopg.connect(dsn) as conn:
        hold = conn.execute(
            "SELECT r.status, a.reserved FROM tollhouse.credit_reservations r"
            " JOIN tollhouse.credit_accounts a USING (tenant_id) WHERE r.turn_id = %s",
            (turn,),
        ).fetchone()
    assert hold == ("pending", 40)
    released = await tollhouse.credits.release(turn_id=turn, user_id=user)
    assert (released.status, released.balance_after) == ("released", 95)


async def test_a_new_time_zone_keeps_todays_use_and_moves_the_day_to_its_own(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """Cap 25: 20 debited and 5 held in Kiritimati (UTC+14), then the zone is Pago Pago
    (UTC-11). The day is now Pago Pago's today with the 25 still counted (the held 5 goes
    when released), and Pago Pago's next midnight frees the cap. Left on Kiritimati's date,
    a day ahead, the cap stayed frozen a further day."""
    await tollhouse.credits.set_plan("free", monthly_credits=0, daily_cap=25, overdraft_limit=0)
    user = await _payer(tollhouse, funds=1000)
    await tollhouse.credits.set_time_zone("Pacific/Kiritimati", user_id=user)
    assert (await tollhouse.credits.debit(_debit(user, 20))).status == "applied"
    held = await tollhouse.credits.reserve(amount=5, turn_id="stream", user_id=user)
    assert held.status == "pending"
    await tollhouse.credits.set_time_zone("Pacific/Pago_Pago", user_id=user)
    tenant = await tollhouse.credits.tenant_of(None, user)
    day = "SELECT day_start = (now() AT TIME ZONE 'Pacific/Pago_Pago')::date, daily_used"
    day += " FROM tollhouse.credit_accounts WHERE tenant_id = %s"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(day, (tenant,)).fetchone() == (True, 25)
        await tollhouse.credits.release(turn_id="stream", user_id=user)
        assert conn.execute(day, (tenant,)).fetchone() == (True, 20)
        assert (await tollhouse.credits.debit(_debit(user, 6))).code == "daily_cap_exceeded"
        # Pago Pago's midnight passes: the account's day is then yesterday's.
        conn.execute(
            "UPDATE tollhouse.credit_accounts SET day_start = day_start - 1 WHERE tenant_id = %s",
            (tenant,),
        )
    assert (await tollhouse.credits.debit(_debit(user, 25))).status == "applied"


async def test_a_new_time_zone_leaves_an_earlier_days_hold_out_of_todays_count(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """Cap 25, zone Kiritimati: a hold of 10 from yesterday (not in today's count) and 15
    debited today. Pago Pago is a day behind, so its today is Kiritimati's yesterday: the
    hold's day must not become the counted day, or releasing it takes 10 off today's 15."""
    await tollhouse.credits.set_plan("free", monthly_credits=0, daily_cap=25, overdraft_limit=0)
    user = await _payer(tollhouse, funds=1000)
    await tollhouse.credits.set_time_zone("Pacific/Kiritimati", user_id=user)
    assert (await tollhouse.credits.debit(_debit(user, 15))).status == "applied"
    held = await tollhouse.credits.reserve(amount=10, turn_id="overnight", user_id=user)
    assert held.status == "pending"
    tenant = await tollhouse.credits.tenant_of(None, user)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Held yesterday (Kiritimati): counted in yesterday's use, not today's 15.
        conn.execute(
            "UPDATE tollhouse.credit_reservations SET day = day - 1 WHERE tenant_id = %s",
            (tenant,),
        )
        conn.execute(
            "UPDATE tollhouse.credit_accounts SET daily_used = 15 WHERE tenant_id = %s",
            (tenant,),
        )
    await tollhouse.credits.set_time_zone("Pacific/Pago_Pago", user_id=user)
    await tollhouse.credits.release(turn_id="overnight", user_id=user)
    with psycopg.connect(dsn, autocommit=True) as conn:
        used = conn.execute(
            "SELECT daily_used FROM tollhouse.credit_accounts WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    assert used == (15,)
    assert (await tollhouse.credits.debit(_debit(user, 20))).code == "daily_cap_exceeded"


async def test_many_connections_storm(
    service_dsn: str, identity_config: IdentityConfig, no_allowance: None, tollhouse: Tollhouse
) -> None:
    """L-02 as the bar asks: 64 concurrent connections, one debit per transaction."""
    user = await _payer(tollhouse, funds=3000)
    async with Tollhouse.open(
        service_dsn, min_size=64, max_size=64, identity=identity_config
    ) as wide:
        rng = random.Random(4)
        amounts = [rng.randint(1, 10) for _ in range(1000)]
        queue = list(amounts)
        results: list[DebitResult] = []

        async def connection_worker() -> None:  # 64 workers, one connection each
            while queue:
                results.append(await wide.credits.debit_alone(_debit(user, queue.pop())))

        await asyncio.gather(*(connection_worker() for _ in range(64)))
        assert len(results) == len(amounts)
    accepted = sum(r.amount for r in results if r.status == "applied")
    final = (await tollhouse.credits.balance(user_id=user)).balance
    assert final == 3000 - accepted and final >= 0
    assert all(r.amount > final for r in results if r.status == "rejected")


async def test_sql_uuid7_is_version_7_and_ordered(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT tollhouse.uuid7() FROM generate_series(1, 2000)"
            ).fetchall()
        ]
    assert all(u.version == 7 and u.variant == "specified in RFC 4122" for u in ids)
    # Time (milliseconds and the sub-millisecond bits) never goes backwards; ids made in the
    # same microsecond may tie there and are then ordered by their random bits.
    stamps = [u.bytes[:8] for u in ids]
    assert stamps == sorted(stamps)


async def _splits(dsn: str, user: uuid.UUID) -> list[tuple[int, int, int]]:
    """How each debit of the user's personal account split: (debit's position, grant's
    priority, amount), in ledger order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT dense_rank() OVER (ORDER BY l.id)::int, g.priority, s.amount"
            " FROM tollhouse.credit_ledger l"
            " JOIN tollhouse.tenants t ON t.id = l.tenant_id AND t.is_default"
            " JOIN tollhouse.credit_ledger_splits s"
            "   ON s.tenant_id = l.tenant_id AND s.ledger_id = l.id"
            " JOIN tollhouse.credit_grants g ON g.tenant_id = s.tenant_id AND g.id = s.grant_id"
            " WHERE t.owner_user_id = %s AND l.kind = 'debit' ORDER BY l.id, g.priority DESC",
            (user,),
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


@pytest.mark.parametrize("repeats", [True, False], ids=["turn-ids-repeat", "all-new"])
async def test_a_batch_decides_exactly_as_one_debit_at_a_time(
    dsn: str, tollhouse: Tollhouse, no_allowance: None, repeats: bool
) -> None:
    """The set-wise batch function against the single-debit function, on twin accounts:
    same outcomes, same balances, same grants left, same splits across grants — duplicates,
    conflicts, rejections, the cap, overdraft and several grants included. Without repeated
    turn ids the batch takes its short path (no turn looked up), so both are run."""
    await tollhouse.credits.set_plan("free", monthly_credits=0, daily_cap=120, overdraft_limit=15)
    twins = [await _payer(tollhouse) for _ in range(2)]
    for user in twins:
        for priority, amount in ((2, 30), (1, 40), (0, 25)):
            await tollhouse.credits.grant(
                amount=amount, source="promo", user_id=user, priority=priority
            )
    rng = random.Random(11)
    plan = [
        (f"t{rng.randint(1, 25) if repeats else n}", rng.choice([5, 10, 20, 35])) for n in range(40)
    ]

    def requests(user: uuid.UUID, prefix: str) -> list[DebitRequest]:
        return [DebitRequest(amount=a, turn_id=f"{prefix}{t}", user_id=user) for t, a in plan]

    batched = await tollhouse.credits._send_batch(requests(twins[0], "b-"))
    alone = [(await tollhouse.credits.debit_alone(r)) for r in requests(twins[1], "s-")]

    def shape(results: list[DebitResult]) -> list[tuple[object, ...]]:
        return [(r.status, r.code, r.amount, r.balance_after, r.replayed) for r in results]

    assert shape(batched) == shape(alone)
    assert {r.status for r in batched} == {"applied", "rejected"}
    assert any(r.replayed for r in batched) == repeats
    left = [await tollhouse.credits.balance(user_id=user) for user in twins]
    assert (left[0].balance, left[0].daily_used) == (left[1].balance, left[1].daily_used)
    assert [g.remaining for g in left[0].grants] == [g.remaining for g in left[1].grants]
    splits = [await _splits(dsn, user) for user in twins]
    assert splits[0] == splits[1]
    assert any(n == 2 for n in Counter(debit for debit, _, _ in splits[0]).values())
    unknown = await tollhouse.credits._send_batch(
        [
            DebitRequest(amount=1, turn_id="nobody", user_id=uuid.uuid4()),
            DebitRequest(amount=1, turn_id="b-extra", user_id=twins[0]),
        ]
    )
    assert [r.code for r in unknown] == ["not_found", unknown[1].code]
    assert await tollhouse.credits._send_batch([]) == []


async def test_in_a_batch_the_earlier_debit_gets_a_shared_new_turn_id(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    """Two payers send one new turn id in the same batch: the first in the array is
    charged, the second gets a conflict, whatever their ids' order."""
    payers = [await _payer(tollhouse, funds=100) for _ in range(2)]
    tenants = {u: (await tollhouse.users.get(u)).personal_tenant_id for u in payers}
    # The higher tenant id first: locked second, yet its debit came first.
    users = sorted(payers, key=lambda u: str(tenants[u]), reverse=True)
    results = await tollhouse.credits._send_batch(
        [
            DebitRequest(amount=10, turn_id="same", user_id=users[0]),
            DebitRequest(amount=10, turn_id="same", user_id=users[1]),
        ]
    )
    assert [(r.status, r.code) for r in results] == [
        ("applied", None),
        ("rejected", "idempotency_conflict"),
    ]


async def test_a_plan_change_mid_period_keeps_the_periods_usage(
    dsn: str, tollhouse: Tollhouse
) -> None:
    """free (100 a month, cap 25) -> pro (5,000, no cap) after using 20: the new allowance
    is 5,000 - 20; back down to free after using more: nothing new, the rest expires."""
    user = await _payer(tollhouse)
    await tollhouse.credits.debit(_debit(user, 20))
    tenant, plan, balance, changed = await tollhouse.credits.change_plan("pro", user_id=user)
    assert (plan, balance, changed) == ("pro", 4980, True)
    after = await tollhouse.credits.balance(user_id=user)
    assert (after.plan, after.daily_cap, after.overdraft_limit) == ("pro", None, 100)
    big = await tollhouse.credits.debit(_debit(user, 200))
    assert big.status == "applied"
    await tollhouse.credits.grant(amount=7, source="purchase", user_id=user)
    _, _, down, _ = await tollhouse.credits.change_plan("free", user_id=user)
    assert down == 7  # the period used 220 > 100: no allowance left, purchases stay
    assert (await tollhouse.credits.change_plan("free", user_id=user))[3] is False
    with pytest.raises(errors.PlanNotFound):
        await tollhouse.credits.change_plan("platinum", user_id=user)
    with psycopg.connect(dsn) as conn:
        reasons = conn.execute(
            "SELECT reason FROM tollhouse.credit_ledger WHERE tenant_id = %s AND kind = 'expiry'",
            (tenant,),
        ).fetchall()
    assert reasons == [("plan_change",), ("plan_change",)]


async def test_setting_a_plan_override_moves_the_account(
    client: httpx.AsyncClient, auth: dict[str, str], tollhouse: Tollhouse
) -> None:
    user = await _payer(tollhouse)
    await tollhouse.credits.debit(_debit(user, 10))
    answer = await client.patch(
        f"/v1/users/{user}", json={"plan_override": "starter"}, headers=auth
    )
    assert answer.json()["plan"] == "starter"
    balance = await tollhouse.credits.balance(user_id=user)
    assert (balance.plan, balance.balance) == ("starter", 990)


async def test_successive_plan_changes_count_only_what_was_spent(
    tollhouse: Tollhouse,
) -> None:
    user = await _payer(tollhouse)
    await tollhouse.credits.debit(_debit(user, 20))  # of free's 100
    await tollhouse.credits.change_plan("pro", user_id=user)  # 5,000 - 20
    await tollhouse.credits.debit(_debit(user, 100))
    _, _, balance, _ = await tollhouse.credits.change_plan("starter", user_id=user)
    assert balance == 1000 - 120  # free's expired 80 is not usage


@pytest.mark.parametrize(("offset_ms", "expected"), [(1, "applied"), (-1, "insufficient_credits")])
async def test_l06_expiry_on_the_database_clock_to_the_millisecond(
    dsn: str, tollhouse: Tollhouse, no_allowance: None, offset_ms: int, expected: str
) -> None:
    """L-06: in one transaction (so one `now()`), a grant expiring 1 ms after the debit's
    clock still pays for it; one that expired 1 ms before does not."""
    user = await _payer(tollhouse)
    await tollhouse.credits.grant(
        amount=30, source="promo", user_id=user, expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    tenant = await tollhouse.credits.tenant_of(None, user)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE tollhouse.credit_grants"
            " SET expires_at = now() + make_interval(secs => %s / 1000.0) WHERE tenant_id = %s",
            (offset_ms, tenant),
        )
        row = conn.execute(
            "SELECT status, code FROM tollhouse.credit_debit_v1(%s, NULL, 10, 'edge', NULL,"
            " 'llm_usage', NULL)",
            (tenant,),
        ).fetchone()
        conn.rollback()
    assert row is not None and (row[1] or row[0]) == expected


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_batches_decide_as_one_debit_at_a_time(
    tollhouse: Tollhouse, no_allowance: None, seed: int
) -> None:
    """The set-wise batch function against the single-debit function on twin worlds of
    several payers: personal accounts, an organisation with limited members, a deleted
    organisation, an expired grant, a pending hold, replays across batches, conflicts,
    other payers' turn ids. Same outcomes and the same accounts, grants and member use."""
    await tollhouse.credits.set_plan("free", monthly_credits=0, daily_cap=150, overdraft_limit=10)
    rng = random.Random(seed)

    async def world(prefix: str) -> list[tuple[uuid.UUID | None, uuid.UUID | None]]:
        users = [await _payer(tollhouse) for _ in range(4)]
        for user in users[:3]:
            for priority, amount in ((1, 40), (0, 60)):
                await tollhouse.credits.grant(
                    amount=amount, source="promo", user_id=user, priority=priority
                )
        org = await tollhouse.orgs.create("Twin", f"twin-{uuid.uuid4().hex[:8]}", users[0])
        await tollhouse.orgs.add_member(org.id, users[1], credit_limit=30)
        await tollhouse.orgs.add_member(org.id, users[2])
        await tollhouse.credits.grant(amount=200, source="purchase", tenant_id=org.id)
        gone = await tollhouse.orgs.create("Gone", f"gone-{uuid.uuid4().hex[:8]}", users[3])
        await tollhouse.credits.grant(amount=50, source="purchase", tenant_id=gone.id)
        await tollhouse.credits.debit_alone(
            DebitRequest(amount=5, turn_id=f"{prefix}before", tenant_id=gone.id)
        )
        await tollhouse.orgs.delete(gone.id, users[3])
        await tollhouse.credits.reserve(amount=15, turn_id=f"{prefix}hold", user_id=users[2])
        # Two personal accounts with an expired grant: several stale tenants in one batch.
        personal = [await tollhouse.credits.tenant_of(None, u) for u in users[:2]]
        await tollhouse.db.transaction(
            lambda conn: conn.execute(
                "UPDATE tollhouse.credit_grants SET expires_at = now() - interval '1 second'"
                " WHERE tenant_id = ANY(%s) AND priority = 1",
                (personal,),
            )
        )
        return [
            (None, users[0]),
            (None, users[1]),
            (None, users[2]),
            (org.id, users[1]),
            (org.id, users[2]),
            (org.id, users[3]),  # not a member
            (org.id, None),
            (gone.id, None),
            (uuid.uuid4(), None),  # no such tenant, now and then between known ones
        ]

    twins = [await world("a-"), await world("b-")]
    plan = [
        (
            8 if rng.random() < 0.06 else rng.randrange(8),
            f"t{rng.randint(1, 30)}",
            rng.choice([3, 7, 12, 25]),
        )
        for _ in range(80)
    ] + [(7, "before", 5), (2, "hold", 15)]
    rng.shuffle(plan)

    def request(
        payers: list[tuple[uuid.UUID | None, uuid.UUID | None]], prefix: str, step: int
    ) -> DebitRequest:
        who, turn, amount = plan[step]
        tenant, user = payers[who]
        return DebitRequest(amount=amount, turn_id=prefix + turn, tenant_id=tenant, user_id=user)

    batched: list[DebitResult] = []
    step = 0
    while step < len(plan):
        size = rng.randint(1, 12)
        chunk = [request(twins[0], "a-", s) for s in range(step, min(step + size, len(plan)))]
        batched += await tollhouse.credits._send_batch(chunk)
        step += size
    alone = [
        await tollhouse.credits.debit_alone(request(twins[1], "b-", s)) for s in range(len(plan))
    ]

    def shape(results: list[DebitResult]) -> list[tuple[object, ...]]:
        return [(r.status, r.code, r.amount, r.balance_after, r.replayed) for r in results]

    assert shape(batched) == shape(alone)
    assert any(r.code == "not_found" for r in batched)  # the unknown tenant was in batches

    async def state(payers: list[tuple[uuid.UUID | None, uuid.UUID | None]]) -> list[object]:
        seen: list[object] = []
        for tenant, user in payers[:3] + payers[6:7]:
            b = await tollhouse.credits.balance(tenant_id=tenant, user_id=None if tenant else user)
            seen.append((b.balance, b.available, b.daily_used, [g.remaining for g in b.grants]))
        org = payers[3][0]
        assert org is not None
        seen.append([(m.role, m.used_credits) for m in await tollhouse.orgs.members(org)])
        return seen

    assert await state(twins[0]) == await state(twins[1])
    async with tollhouse.db.connection() as conn:
        assert await conservation_problems(conn) == []


async def test_a_batchs_ledger_ids_are_uuid7_unique_and_in_arrival_order(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    """Two batches on one payer: every ledger id is a distinct UUIDv7, and ids sort as the
    debits were decided (within a batch and from one batch to the next)."""
    user = await _payer(tollhouse, funds=1000)
    first = await tollhouse.credits._send_batch([_debit(user, 1) for _ in range(40)])
    second = await tollhouse.credits._send_batch([_debit(user, 1) for _ in range(40)])
    ids = [r.ledger_id for r in first + second]
    assert all(i is not None and i.version == 7 for i in ids)
    assert len(set(ids)) == 80
    assert ids == sorted(ids, key=lambda i: i.bytes if i else b"")
    assert [r.balance_after for r in first + second] == list(range(999, 919, -1))


async def _limited_member(tollhouse: Tollhouse, limit: int) -> tuple[uuid.UUID, uuid.UUID]:
    """An organisation with 1,000 credits and a member limited to `limit` of them."""
    owner, member = await _payer(tollhouse), await _payer(tollhouse)
    org = await tollhouse.orgs.create("Limits", f"limits-{uuid.uuid4().hex[:8]}", owner)
    await tollhouse.orgs.add_member(org.id, member, credit_limit=limit)
    await tollhouse.credits.grant(amount=1000, source="purchase", tenant_id=org.id)
    return org.id, member


async def test_a_batch_does_not_count_a_members_expired_hold_against_its_limit(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    """A member (limit 100) held 80 and the hold expired: a batch of two debits of 50
    applies both, as one debit at a time would (the account is brought up to date, and its
    expired holds released, before the member's limit is read)."""
    org, member = await _limited_member(tollhouse, 100)
    await tollhouse.credits.reserve(amount=80, turn_id="held", tenant_id=org, user_id=member)
    await tollhouse.db.transaction(
        lambda conn: conn.execute(
            "UPDATE tollhouse.credit_reservations SET expires_at = now() - interval '1 second'"
            " WHERE tenant_id = %s",
            (org,),
        )
    )
    results = await tollhouse.credits._send_batch(
        [DebitRequest(amount=50, turn_id=f"m{n}", tenant_id=org, user_id=member) for n in (1, 2)]
    )
    assert [(r.status, r.code) for r in results] == [("applied", None)] * 2


@pytest.mark.parametrize("path", ["batch", "alone"])
async def test_a_deleted_user_spends_nothing_from_its_personal_tenant_named(
    dsn: str, tollhouse: Tollhouse, no_allowance: None, path: str
) -> None:
    """A soft-deleted user naming its personal tenant with its user_id is refused like a
    deleted member of a pool (the owner's pass came before the deleted_at check)."""
    user = await _payer(tollhouse, funds=100)
    tenant = await tollhouse.credits.tenant_of(None, user)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE tollhouse.users SET deleted_at = now() WHERE id = %s", (user,))
    named = [
        DebitRequest(amount=10, turn_id=f"t{n}", tenant_id=tenant, user_id=user) for n in (1, 2)
    ]
    if path == "batch":
        results = await tollhouse.credits._send_batch(named)
    else:
        results = [await tollhouse.credits.debit_alone(request) for request in named]
    assert [(r.status, r.code) for r in results] == [("rejected", "not_a_member")] * 2
    balance = await tollhouse.credits.balance(tenant_id=tenant)
    assert balance.balance == 100


async def test_a_batch_counts_a_members_use_in_the_new_period(
    tollhouse: Tollhouse, no_allowance: None
) -> None:
    """A member (limit 100) used 90 last period: the first batch of the new period counts
    from 0 (the period moves before the member's use is read) and records 50."""
    org, member = await _limited_member(tollhouse, 100)
    used = await tollhouse.credits.debit_alone(
        DebitRequest(amount=90, turn_id="last-period", tenant_id=org, user_id=member)
    )
    assert used.status == "applied"
    await tollhouse.db.transaction(
        lambda conn: conn.execute(
            "UPDATE tollhouse.credit_accounts SET created_at = created_at - interval '32 days',"
            " period_start = period_start - interval '32 days',"
            " period_end = period_end - interval '32 days', allowance_for = allowance_for"
            " - interval '32 days' WHERE tenant_id = %s",
            (org,),
        )
    )
    results = await tollhouse.credits._send_batch(
        [DebitRequest(amount=50, turn_id=f"new{n}", tenant_id=org, user_id=member) for n in (1, 2)]
    )
    assert [(r.status, r.code) for r in results] == [("applied", None)] * 2
    members = {m.user_id: m for m in await tollhouse.orgs.members(org)}
    assert members[member].used_credits == 100


async def test_a_batchs_debit_sorts_after_the_expiry_its_refresh_wrote(
    dsn: str, tollhouse: Tollhouse, no_allowance: None
) -> None:
    """A grant expired before the batch: the batch expires it, then debits; in the ledger
    (ordered by id) the expiry comes first, so `balance_after` reads in order."""
    user = await _payer(tollhouse, funds=100)
    await tollhouse.credits.grant(
        amount=30, source="promo", user_id=user, expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    tenant = await tollhouse.credits.tenant_of(None, user)
    await tollhouse.db.transaction(
        lambda conn: conn.execute(
            "UPDATE tollhouse.credit_grants SET expires_at = now() - interval '1 second'"
            " WHERE tenant_id = %s AND source = 'promo'",
            (tenant,),
        )
    )
    await tollhouse.credits._send_batch([_debit(user, 10), _debit(user, 5)])
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT kind, balance_after FROM tollhouse.credit_ledger WHERE tenant_id = %s"
            " ORDER BY id",
            (tenant,),
        ).fetchall()
    assert rows[-3:] == [("expiry", 100), ("debit", 90), ("debit", 85)]


@pytest.mark.parametrize(
    ("constraint", "column"),
    [("credit_ledger_reason_check", "reason"), ("usage_counters_metric_check", "metric")],
)
def test_reason_and_metric_checks_are_the_documented_pattern(
    dsn: str, constraint: str, column: str
) -> None:
    """The checks (a cheaper form since 0013) accept exactly the values
    `^[a-z][a-z0-9_.:-]{0,63}$` accepts: edge cases and 20,000 random strings."""
    rng = random.Random(13)
    allowed = "abcxyz0189_.:-"
    mixed = allowed + "AZ ~/$^\n\té€ßａ"
    samples = ["", "a", "z", "A", "0", "_", "a" * 64, "a" * 65, "llm_usage", "é", "a\n", "ab "]
    samples += [
        "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 5, 63, 64, 65, 70])))
        for alphabet in (allowed, mixed)
        for _ in range(10_000)
    ]
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s",
            (constraint,),
        ).fetchone()
        assert row is not None and "{0,63}" not in row[0]
        # (The reason's rule is a domain's since 0016, added NOT VALID: the same expression.)
        check = row[0].removeprefix("CHECK ").removesuffix(" NOT VALID").replace(column, "value")
        differ = conn.execute(
            f"SELECT value FROM unnest(%s::text[]) AS x(value)"
            f" WHERE ({check}) IS DISTINCT FROM (value ~ '^[a-z][a-z0-9_.:-]{{0,63}}$')",
            (samples,),
        ).fetchall()
    assert differ == []
    assert sum(1 for s in samples if re.fullmatch(r"[a-z][a-z0-9_.:-]{0,63}", s)) > 2_000


@pytest.mark.parametrize("amount", [-5, 0])
async def test_the_functions_refuse_a_debit_that_is_not_positive(
    service_dsn: str, tollhouse: Tollhouse, amount: int
) -> None:
    """The service refuses such an amount at its edge; called directly, the single and the
    batch function fail on a check (the batch as a whole, on the outcome's amount or the
    daily counter) and change nothing."""
    user = await _payer(tollhouse, funds=50)
    tenant = (await tollhouse.users.get(user)).personal_tenant_id
    before = await tollhouse.credits.balance(user_id=user)
    with psycopg.connect(service_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "SELECT tollhouse.credit_debit_v1(%s, NULL, %s, 'single', NULL, 'llm_usage',"
                " '{}'::jsonb)",
                (tenant, amount),
            )
        # A negative amount may be refused first by the daily counter's rule (a domain since
        # 0016, checked when the function's copy of the account row takes the new count).
        with pytest.raises(
            psycopg.errors.CheckViolation,
            match=r"credit_debits_amount_check|credit_accounts_daily_used_check",
        ):
            conn.execute(
                "SELECT * FROM tollhouse.credit_debit_batch_v1(%s::uuid[], %s::uuid[],"
                " %s::bigint[], %s::text[], %s::text[], %s::text[], %s::jsonb[])",
                (
                    [tenant, tenant],
                    [None, None],
                    [3, amount],
                    ["fine", "batch"],
                    [None, None],
                    ["llm_usage", "llm_usage"],
                    ["{}", "{}"],
                ),
            )
    after = await tollhouse.credits.balance(user_id=user)
    assert (after.balance, [g.remaining for g in after.grants]) == (
        before.balance,
        [g.remaining for g in before.grants],
    )
    assert await _ledger_debits(service_dsn) == 0
