"""L-13: a Hypothesis state machine runs random grant / debit / replay / reserve / commit /
release / clock-advance sequences against the database and a Python model of the rules,
and compares every outcome and the account after every step.

The clock advances by moving the account's times (grant and hold expiries, the period)
back, which is what the database sees when time moves forward.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tollhouse.app import Tollhouse
from tollhouse.credits import DebitRequest, conservation_problems
from tollhouse.identity import IdentityConfig

T = TypeVar("T")
HOUR = 3600
OVERDRAFT = 20


@dataclass
class ModelGrant:
    order: int
    remaining: int
    priority: int
    expires_at: float | None


@dataclass
class Model:
    now: float = 0.0
    balance: int = 0
    reserved: int = 0
    grants: list[ModelGrant] = field(default_factory=list)
    debits: dict[str, tuple[int, str, int | None]] = field(default_factory=dict)
    holds: dict[str, tuple[int, str, float]] = field(default_factory=dict)

    def refresh(self) -> None:
        for grant in sorted(self.grants, key=lambda g: (g.expires_at or 0, g.order)):
            if grant.expires_at is not None and grant.expires_at <= self.now and grant.remaining:
                self.balance -= grant.remaining
                grant.remaining = 0
        for turn, (amount, status, expires_at) in list(self.holds.items()):
            if status == "pending" and expires_at <= self.now:
                self.reserved -= amount
                self.holds[turn] = (amount, "expired", expires_at)

    def grant(self, amount: int, priority: int, expires_in: float | None) -> int:
        self.refresh()
        repay = min(amount, max(0, -self.balance))
        expires = None if expires_in is None else self.now + expires_in
        self.grants.append(ModelGrant(len(self.grants), amount - repay, priority, expires))
        self.balance += amount
        return self.balance

    def debit(self, turn: str, amount: int) -> tuple[str, str | None, int | None]:
        self.refresh()
        if turn in self.debits:
            stored = self.debits[turn]
            if stored[0] != amount:
                return "rejected", "idempotency_conflict", None
            return stored[1], None if stored[1] == "applied" else "insufficient_credits", stored[2]
        if self.balance - self.reserved - amount < -OVERDRAFT:
            self.debits[turn] = (amount, "rejected", None)
            return "rejected", "insufficient_credits", None
        left = amount
        live = [
            g
            for g in self.grants
            if g.remaining > 0 and (g.expires_at is None or g.expires_at > self.now)
        ]
        live.sort(key=lambda g: (-g.priority, g.expires_at is None, g.expires_at or 0, g.order))
        for grant in live:
            take = min(left, grant.remaining)
            grant.remaining -= take
            left -= take
            if left == 0:
                break
        self.balance -= amount
        self.debits[turn] = (amount, "applied", self.balance)
        return "applied", None, self.balance

    def reserve(self, turn: str, amount: int, ttl: float) -> str:
        self.refresh()
        if self.balance - self.reserved - amount < -OVERDRAFT:
            return "rejected"
        self.reserved += amount
        self.holds[turn] = (amount, "pending", self.now + ttl)
        return "pending"

    def resolve(self, turn: str, amount: int | None) -> tuple[str, str | None]:
        self.refresh()
        held, status, expires_at = self.holds[turn]
        if status == "released" and amount is None:
            return "released", None  # the same resolution again: a replay
        if status == "committed" and amount is not None and turn in self.debits:
            stored_amount, stored_status, _ = self.debits[turn]
            if stored_amount == amount:
                return stored_status, None if stored_status == "applied" else "insufficient_credits"
        if status != "pending":
            return "rejected", f"reservation_{status}"
        if amount is not None and self.balance - (self.reserved - held) - amount < -OVERDRAFT:
            return "rejected", "insufficient_credits"  # the hold stays pending
        self.reserved -= held
        if amount is None:
            self.holds[turn] = (held, "released", expires_at)
            return "released", None
        self.holds[turn] = (held, "committed", expires_at)
        status, code, _ = self.debit(turn, amount)
        return status, code


@dataclass
class Shared:
    """What every example of one test run shares: the loop, the services, an admin
    connection (opening them per example would cost more than the steps)."""

    loop: asyncio.AbstractEventLoop
    tollhouse: Tollhouse
    admin: psycopg.AsyncConnection[Any]


class CreditsMachine(RuleBasedStateMachine):
    shared: Shared

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.user = uuid.uuid4()
        self.tenant = uuid.uuid4()
        self.turns = 0
        self.prefix = uuid.uuid4().hex[:8]  # turn ids are global: unique per example
        self.started = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.shared.loop.run_until_complete(coro)

    @initialize()
    def start(self) -> None:
        user = self._run(self.th.users.create(email=f"{uuid.uuid4().hex}@m.example"))
        self.user = user.id
        self.tenant = self._run(self.th.credits.tenant_of(None, user.id))
        self.started = True

    @property
    def th(self) -> Tollhouse:
        return self.shared.tollhouse

    @rule(
        amount=st.integers(1, 60),
        priority=st.integers(0, 3),
        expires_hours=st.one_of(st.none(), st.integers(1, 48)),
    )
    def grant(self, amount: int, priority: int, expires_hours: int | None) -> None:
        from datetime import UTC, datetime, timedelta

        expires_in = None if expires_hours is None else expires_hours * HOUR
        expected = self.model.grant(amount, priority, expires_in)
        expires_at = (
            None if expires_in is None else datetime.now(UTC) + timedelta(seconds=expires_in)
        )
        result = self._run(
            self.th.credits.grant(
                amount=amount,
                source="promo",
                user_id=self.user,
                priority=priority,
                expires_at=expires_at,
            )
        )
        assert result.balance_after == expected

    @rule(amount=st.integers(1, 40))
    def debit(self, amount: int) -> None:
        self.turns += 1
        turn = f"{self.prefix}-{self.turns}"
        expected = self.model.debit(turn, amount)
        result = self._run(
            self.th.credits.debit(DebitRequest(amount=amount, turn_id=turn, user_id=self.user))
        )
        assert (result.status, result.code, result.balance_after) == expected

    @precondition(lambda self: bool(self.model.debits))
    @rule(data=st.data(), same=st.booleans())
    def replay(self, data: st.DataObject, same: bool) -> None:
        turn = data.draw(st.sampled_from(sorted(self.model.debits)))
        amount = self.model.debits[turn][0] + (0 if same else 1)
        expected = self.model.debit(turn, amount)
        result = self._run(
            self.th.credits.debit(DebitRequest(amount=amount, turn_id=turn, user_id=self.user))
        )
        assert (result.status, result.code, result.balance_after) == expected

    @rule(amount=st.integers(1, 40), ttl_hours=st.integers(1, 12))
    def reserve(self, amount: int, ttl_hours: int) -> None:
        self.turns += 1
        turn = f"{self.prefix}-{self.turns}"
        expected = self.model.reserve(turn, amount, ttl_hours * HOUR)
        result = self._run(
            self.th.credits.reserve(
                amount=amount, turn_id=turn, user_id=self.user, ttl_seconds=ttl_hours * HOUR
            )
        )
        assert result.status == expected

    @precondition(lambda self: bool(self.model.holds))
    @rule(data=st.data(), release=st.booleans())
    def resolve(self, data: st.DataObject, release: bool) -> None:
        turn = data.draw(st.sampled_from(sorted(self.model.holds)))
        held = self.model.holds[turn][0]
        amount = None if release else data.draw(st.integers(1, held))
        expected = self.model.resolve(turn, amount)
        if amount is None:
            result = self._run(self.th.credits.release(turn_id=turn, user_id=self.user))
        else:
            result = self._run(
                self.th.credits.commit(turn_id=turn, amount=amount, user_id=self.user)
            )
        assert (result.status, result.code) == expected

    @rule(hours=st.integers(1, 30))
    def advance(self, hours: int) -> None:
        self.model.now += hours * HOUR
        shift = f"{hours} hours"

        async def move() -> None:
            admin = self.shared.admin
            params = {"shift": shift, "tenant": self.tenant}
            await admin.execute(
                "UPDATE tollhouse.credit_grants SET expires_at = expires_at - %(shift)s::interval"
                " WHERE tenant_id = %(tenant)s",
                params,
            )
            await admin.execute(
                "UPDATE tollhouse.credit_reservations"
                " SET expires_at = expires_at - %(shift)s::interval WHERE tenant_id = %(tenant)s",
                params,
            )
            await admin.execute(
                "UPDATE tollhouse.credit_accounts SET period_start = period_start"
                " - %(shift)s::interval, period_end = period_end - %(shift)s::interval,"
                " allowance_for = allowance_for - %(shift)s::interval WHERE tenant_id = %(tenant)s",
                params,
            )

        self._run(move())

    @invariant()
    def same_account(self) -> None:
        if not self.started:
            return
        balance = self._run(self.th.credits.balance(user_id=self.user))
        self.model.refresh()
        assert balance.balance == self.model.balance
        assert balance.available == self.model.balance - self.model.reserved + OVERDRAFT
        live = sorted(g.remaining for g in self.model.grants if g.remaining > 0)
        assert sorted(g.remaining for g in balance.grants) == live

    @invariant()
    def conserved(self) -> None:
        if not self.started:
            return

        async def check() -> list[str]:
            async with self.th.db.connection() as conn:
                return await conservation_problems(conn, self.tenant)

        assert self._run(check()) == []


def test_the_database_follows_the_model(
    dsn: str, service_dsn: str, identity_config: IdentityConfig
) -> None:
    """L-13 at the per-PR budget: 200 examples of up to 50 steps; every account of the run
    is conserved at the end."""
    loop = asyncio.new_event_loop()

    async def open_shared() -> tuple[AbstractAsyncContextManager[Tollhouse], Shared]:
        context = Tollhouse.open(service_dsn, min_size=1, max_size=2, identity=identity_config)
        tollhouse = await context.__aenter__()
        for name in ("free", "starter", "pro", "power"):
            await tollhouse.credits.set_plan(
                name, monthly_credits=0, daily_cap=None, overdraft_limit=OVERDRAFT
            )
        admin = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        return context, Shared(loop, tollhouse, admin)

    context, shared = loop.run_until_complete(open_shared())
    CreditsMachine.shared = shared
    try:
        runner = CreditsMachine.TestCase
        runner.settings = settings(
            max_examples=200,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        runner().runTest()

        async def everything() -> list[str]:
            return await conservation_problems(shared.admin)

        assert loop.run_until_complete(everything()) == []
    finally:
        loop.run_until_complete(shared.admin.close())
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()
