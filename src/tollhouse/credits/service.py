"""Credits: debits through group commit, grants, balances, the ledger and plans."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

from tollhouse import errors as e
from tollhouse.credits.batcher import SPREAD_MIN, DebitBatcher
from tollhouse.credits.records import (
    Balance,
    DebitRequest,
    DebitResult,
    GrantResult,
    GrantView,
    LedgerEntry,
    Plan,
)
from tollhouse.db.arrays import int_array, jsonb_array, text_array, uuid_array
from tollhouse.db.errors import RETRYABLE_SQLSTATES
from tollhouse.db.pool import Database
from tollhouse.db.queries import Queries
from tollhouse.db.values import unstorable

queries = Queries("tollhouse.credits", "queries.sql")
log = structlog.get_logger(__name__)

MAX_AMOUNT = 10**15
#: An expiry is a time both PostgreSQL and Python read back: from 1970 to the end of 9999,
#: in UTC (9999-12-31 23:00-01:00 is already the year 10000 there).
FIRST_EXPIRY = datetime(1970, 1, 1, tzinfo=UTC)
LAST_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
#: A negative adjustment is the debit of turn `adjustment:<tenant>:<id>`; no client turn
#: may look like one.
ADJUSTMENT_TURNS = "adjustment:"
#: The longest adjustment id: a positive one's grant has the source id `adjustment:<id>`, of
#: at most 200 characters. (A negative one's turn names an id too long for it by its hash.)
MAX_ADJUSTMENT_ID = 200 - len(ADJUSTMENT_TURNS)
_CONSTRAINTS = {
    "credit_grants_source_key": e.IdempotencyConflict,
    "credit_grants_total_check": e.InvalidRequest,
    "credit_grants_source_check": e.InvalidRequest,
    "credit_ledger_reason_check": e.InvalidRequest,
    "credit_ledger_metadata_check": e.InvalidRequest,
    "credit_debits_turn_id_check": e.InvalidRequest,
    "credit_debits_amount_check": e.InvalidRequest,
    "plans_name_check": e.InvalidRequest,
    "plans_monthly_credits_check": e.InvalidRequest,
    "plans_daily_cap_check": e.InvalidRequest,
    "plans_overdraft_limit_check": e.InvalidRequest,
    "usage_counters_metric_check": e.InvalidRequest,
    "usage_counters_tenant_id_fkey": e.PayerNotFound,
    "credit_accounts_plan_fkey": e.PlanNotFound,
}
_REJECTIONS: dict[str, type[e.TollhouseError]] = {
    "insufficient_credits": e.InsufficientCredits,
    "daily_cap_exceeded": e.DailyCapExceeded,
    "idempotency_conflict": e.IdempotencyConflict,
    "not_found": e.PayerNotFound,
    "reservation_not_found": e.ReservationNotFound,
    "reservation_committed": e.ReservationCommitted,
    "reservation_released": e.ReservationReleased,
    "reservation_expired": e.ReservationExpired,
    "commit_exceeds_reservation": e.CommitExceedsReservation,
    "not_a_member": e.NotAMember,
    "member_limit_exceeded": e.MemberLimitExceeded,
}


def rejection(result: DebitResult) -> e.TollhouseError | None:
    """The domain error of a rejected debit, or None when it applied."""
    if result.status == "applied" or result.code is None:
        return None
    return _REJECTIONS.get(result.code, e.TollhouseError)(
        tenant_id=str(result.tenant_id) if result.tenant_id else None, amount=result.amount
    )


def _check(request: DebitRequest) -> None:
    if request.tenant_id is None and request.user_id is None:
        raise e.InvalidRequest("name the payer: user_id or tenant_id")
    if type(request.amount) is not int or not 0 < request.amount <= MAX_AMOUNT:
        raise e.InvalidRequest(f"amount must be between 1 and {MAX_AMOUNT}", field="amount")
    for name in ("tenant_id", "user_id"):
        payer = getattr(request, name)
        if payer is not None and type(payer) is not uuid.UUID:
            raise e.InvalidRequest(f"{name} must be a UUID", field=name)
    if not isinstance(request.metadata, dict):
        raise e.InvalidRequest("metadata must be a JSON object", field="metadata")
    for name in ("turn_id", "session_id", "reason", "metadata"):
        reason = unstorable(getattr(request, name))
        if reason:
            raise e.InvalidRequest(reason, field=name)


class CreditService:
    """The credits engine over one pool."""

    def __init__(
        self,
        db: Database,
        *,
        lanes: int = 2,
        max_batch: int = 256,
        spread: bool = True,
        spread_min: int = SPREAD_MIN,
    ) -> None:
        self._db = db
        #: The batcher's calls go on connections of their own, which stay warm
        #: (`Database.lanes`); a debit alone goes on the main pool.
        self.lane_db = db.lanes(lanes, "credit-lanes")
        self.batcher = DebitBatcher(
            self._send_batch,
            self._send_lone,
            lanes=lanes,
            max_batch=max_batch,
            spread=spread,
            spread_min=spread_min,
        )

    async def close(self) -> None:
        """Answer what is queued or in flight, then close the lanes' connections."""
        await self.batcher.close()
        await self.lane_db.close()

    # --- debits ------------------------------------------------------------------------------

    async def debit(self, request: DebitRequest) -> DebitResult:
        """Debit through group commit. Rejections come back as results, not exceptions."""
        _check(request)
        await self._refuse_new_adjustment_turn(request.turn_id)
        return await self.batcher.submit(request)

    async def debit_alone(self, request: DebitRequest) -> DebitResult:
        """One debit in its own transaction (no coalescing)."""
        _check(request)
        await self._refuse_new_adjustment_turn(request.turn_id)
        return (await self._send_one([request]))[0]

    async def _refuse_new_adjustment_turn(self, turn_id: str) -> None:
        """`TurnIdReserved` for a new turn id that looks like an adjustment's: those name
        adjustments' debits. A turn used before that rule (migration 0022) may still be
        repeated and gets its recorded answer, as any retry does."""
        if not (isinstance(turn_id, str) and turn_id.startswith(ADJUSTMENT_TURNS)):
            return
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["turn_known"], {"turn_id": turn_id})
            row = await cur.fetchone()
        if row is None or not row[0]:
            raise e.TurnIdReserved(field="turn_id")

    async def _send_lone(self, requests: Sequence[DebitRequest]) -> list[DebitResult]:
        """A batch of one, on a lane: `credit_debit_v1`, the single-debit function."""
        return await self._send_one(requests, self.lane_db)

    async def _send_one(
        self, requests: Sequence[DebitRequest], db: Database | None = None
    ) -> list[DebitResult]:
        (request,) = requests
        params = {
            "tenant_id": request.tenant_id,
            "user_id": request.user_id,
            "amount": request.amount,
            "turn_id": request.turn_id,
            "session_id": request.session_id,
            "reason": request.reason,
            "metadata": Jsonb(request.metadata),
        }
        return await self._call("debit", params, db)

    async def _send_batch(self, requests: Sequence[DebitRequest]) -> list[DebitResult]:
        # Array literals built with joins: psycopg's list adaptation, element by element, was
        # a fifth of the service's CPU per coalesced debit.
        params = {
            "tenant_ids": uuid_array([r.tenant_id for r in requests]),
            "user_ids": uuid_array([r.user_id for r in requests]),
            "amounts": int_array([r.amount for r in requests]),
            "turn_ids": text_array([r.turn_id for r in requests]),
            "session_ids": text_array([r.session_id for r in requests]),
            "reasons": text_array([r.reason for r in requests]),
            "metadata": jsonb_array([r.metadata for r in requests]),
        }
        return await self._call("debit_batch", params, self.lane_db)

    async def _call(
        self, query: str, params: dict[str, Any], db: Database | None = None
    ) -> list[DebitResult]:
        # One statement is one transaction: a deadlock or serialization failure rolled it all
        # back, so it can simply be sent again.
        for attempt in range(1, 6):
            try:
                async with (db or self._db).connection() as conn:
                    cur = conn.cursor(row_factory=class_row(DebitResult))
                    await cur.execute(queries[query], params)
                    return await cur.fetchall()
            except e.DatabaseError as exc:
                if exc.fields.get("sqlstate") not in RETRYABLE_SQLSTATES or attempt == 5:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # --- reservations, refunds, usage -------------------------------------------------------

    async def reserve(
        self,
        *,
        amount: int,
        turn_id: str,
        tenant_id: uuid.UUID | None = None,
        user_id: uuid.UUID | None = None,
        ttl_seconds: int = 600,
        session_id: str | None = None,
    ) -> DebitResult:
        """Hold up to `amount` for a turn; status `pending`, or a rejection."""
        _check(DebitRequest(amount=amount, turn_id=turn_id, tenant_id=tenant_id, user_id=user_id))
        await self._refuse_new_adjustment_turn(turn_id)
        if not 1 <= ttl_seconds <= 7 * 24 * 3600:
            raise e.InvalidRequest("ttl_seconds must be between 1 and 604800", field="ttl_seconds")
        params = {
            "tenant_id": tenant_id,
            "user_id": user_id,
            "amount": amount,
            "turn_id": turn_id,
            "ttl": ttl_seconds,
            "session_id": session_id,
        }
        return (await self._call("reserve", params))[0]

    async def commit(
        self,
        *,
        turn_id: str,
        amount: int,
        tenant_id: uuid.UUID | None = None,
        user_id: uuid.UUID | None = None,
        reason: str = "llm_usage",
        metadata: dict[str, Any] | None = None,
    ) -> DebitResult:
        """Debit the actual amount (at most the reserved one); the rest goes back."""
        if amount < 0:
            raise e.InvalidRequest("amount must not be negative", field="amount")
        return await self._resolve(turn_id, amount, tenant_id, user_id, reason, metadata)

    async def release(
        self, *, turn_id: str, tenant_id: uuid.UUID | None = None, user_id: uuid.UUID | None = None
    ) -> DebitResult:
        """Give the whole hold back."""
        return await self._resolve(turn_id, None, tenant_id, user_id, "llm_usage", None)

    async def _resolve(
        self,
        turn_id: str,
        amount: int | None,
        tenant_id: uuid.UUID | None,
        user_id: uuid.UUID | None,
        reason: str,
        metadata: dict[str, Any] | None,
    ) -> DebitResult:
        if tenant_id is None and user_id is None:
            raise e.InvalidRequest("name the payer: user_id or tenant_id")
        params = {
            "tenant_id": tenant_id,
            "user_id": user_id,
            "turn_id": turn_id,
            "amount": amount,
            "reason": reason,
            "metadata": Jsonb(metadata or {}),
        }
        return (await self._call("resolve", params))[0]

    async def refund(
        self, ledger_id: uuid.UUID, *, total: int | None = None, user_id: uuid.UUID | None = None
    ) -> tuple[uuid.UUID, int, int]:
        """Refund a debit so that `total` of it (default: all) has been refunded; repeating
        the same total changes nothing. Returns (tenant, refunded so far, balance)."""
        async with self._db.connection() as conn:
            cur = await conn.execute(
                queries["refund"], {"ledger_id": ledger_id, "total": total, "user_id": user_id}
            )
            row = await cur.fetchone()
        assert row is not None
        tenant, refunded, balance, code = row
        if code == "ledger_entry_not_found":
            raise e.LedgerEntryNotFound()
        if code == "refund_exceeds_debit":
            raise e.RefundExceedsDebit()
        return tenant, refunded, balance

    async def usage_increment(
        self, tenant_id: uuid.UUID, metric: str, *, amount: int, limit: int, window_seconds: int
    ) -> tuple[bool, int]:
        """Count `amount` of a metric in the current window if it stays within `limit`;
        returns (allowed, used)."""
        async with self._db.connection(_CONSTRAINTS) as conn:
            cur = await conn.execute(
                queries["usage_increment"],
                {
                    "tenant_id": tenant_id,
                    "metric": metric,
                    "amount": amount,
                    "limit": limit,
                    "window": window_seconds,
                },
            )
            row = await cur.fetchone()
        assert row is not None
        return bool(row[0]), int(row[1])

    async def sweep(self, *, batch: int = 500, per_transaction: int = 100) -> int:
        """Apply what is due on every account (period renewals, expiries, expired holds);
        returns how many accounts changed. Safe to run concurrently, repeatedly, and to kill
        at any point: each account's renewal is idempotent, so a rerun does the rest."""
        done = 0
        after = uuid.UUID(int=0)
        while True:
            async with self._db.connection() as conn:
                cur = await conn.execute(
                    queries["stale_accounts"], {"limit": batch, "after": after}
                )
                tenants = [row[0] for row in await cur.fetchall()]
            for start in range(0, len(tenants), per_transaction):
                done += await self._refresh(tenants[start : start + per_transaction])
            if len(tenants) < batch:
                return done
            after = tenants[-1]

    async def _refresh(self, tenants: list[uuid.UUID]) -> int:
        """Refresh accounts in one transaction; if one of them fails, each on its own, so one
        broken account does not hold up the rest."""
        try:
            async with self._db.connection() as conn:
                await conn.execute(queries["refresh_accounts"], {"tenant_ids": tenants})
            return len(tenants)
        except e.DatabaseUnavailable:
            raise
        except e.TollhouseError:
            pass
        done = 0
        for tenant in tenants:
            try:
                async with self._db.connection() as conn:
                    await conn.execute(queries["refresh_account"], {"tenant_id": tenant})
                done += 1
            except e.DatabaseUnavailable:
                raise
            except e.TollhouseError as exc:
                log.error("credits_sweep_failed", tenant_id=str(tenant), error=exc.message)
        return done

    # --- grants, balances, ledger ------------------------------------------------------------

    async def grant(
        self,
        *,
        amount: int,
        source: str,
        tenant_id: uuid.UUID | None = None,
        user_id: uuid.UUID | None = None,
        source_id: str | None = None,
        priority: int = 0,
        expires_at: datetime | None = None,
    ) -> GrantResult:
        """Add credits; with a `source_id`, a repeat returns the first grant."""
        if not 0 < amount <= MAX_AMOUNT:
            raise e.InvalidRequest(f"amount must be between 1 and {MAX_AMOUNT}", field="amount")
        expires_at = _expiry(expires_at)
        async with self._db.connection(_CONSTRAINTS) as conn:
            cur = conn.cursor(row_factory=class_row(GrantResult))
            await cur.execute(
                queries["grant"],
                {
                    "tenant_id": tenant_id,
                    "user_id": user_id,
                    "amount": amount,
                    "source": source,
                    "source_id": source_id,
                    "priority": priority,
                    "expires_at": expires_at,
                },
            )
            result = await cur.fetchone()
        if result is None:
            raise e.PayerNotFound()
        return result

    async def adjust(
        self,
        *,
        amount: int,
        adjustment_id: str,
        note: str,
        tenant_id: uuid.UUID | None = None,
        user_id: uuid.UUID | None = None,
    ) -> DebitResult:
        """An admin correction, either way, once per `adjustment_id`: a positive amount is a
        grant; a negative one takes credits past the daily cap and member limits but never
        below the overdraft floor, and does not count as the day's usage."""
        if amount == 0 or abs(amount) > MAX_AMOUNT:
            raise e.InvalidRequest(
                f"amount must be non-zero and at most {MAX_AMOUNT} either way", field="amount"
            )
        if not note.strip() or len(note) > 500:
            raise e.InvalidRequest("note must say why, in 1 to 500 characters", field="note")
        if not 0 < len(adjustment_id) <= MAX_ADJUSTMENT_ID:
            raise e.InvalidRequest(
                f"adjustment_id must be 1 to {MAX_ADJUSTMENT_ID} characters", field="adjustment_id"
            )
        if tenant_id is None and user_id is None:
            raise e.InvalidRequest("name the payer: user_id or tenant_id")
        params = {
            "tenant_id": tenant_id,
            "user_id": user_id,
            "amount": amount,
            "adjustment_id": adjustment_id,
            "note": note,
        }
        return (await self._call("adjust", params))[0]

    async def set_time_zone(
        self,
        time_zone: str,
        *,
        tenant_id: uuid.UUID | None = None,
        user_id: uuid.UUID | None = None,
    ) -> Balance:
        """Where the account's day (its daily cap) starts: an IANA zone name, UTC by default."""
        tenant = await self.tenant_of(tenant_id, user_id)
        params = {"tenant_id": tenant, "time_zone": time_zone}

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            cur = await conn.execute(queries["time_zone_known"], params)
            known = await cur.fetchone()
            if not (known and known[0]):
                raise e.InvalidRequest(f"{time_zone!r} is not a time zone", field="time_zone")
            await conn.execute(queries["refresh_account"], params)
            await conn.execute(queries["set_time_zone"], params)

        await self._db.transaction(work)
        return await self.balance(tenant_id=tenant)

    async def tenant_of(self, tenant_id: uuid.UUID | None, user_id: uuid.UUID | None) -> uuid.UUID:
        async with self._db.connection() as conn:
            cur = await conn.execute(
                queries["resolve_tenant"], {"tenant_id": tenant_id, "user_id": user_id}
            )
            row = await cur.fetchone()
        if row is None:
            raise e.PayerNotFound()
        return uuid.UUID(str(row[0]))

    async def balance(
        self, *, tenant_id: uuid.UUID | None = None, user_id: uuid.UUID | None = None
    ) -> Balance:
        tenant = await self.tenant_of(tenant_id, user_id)
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["account_fresh"], {"tenant_id": tenant})
            fresh = await cur.fetchone()
            if fresh is None or not fresh[0]:
                # Rare: first use, a new period or an expiry to apply. Writes, under the lock.
                await conn.execute(queries["refresh_account"], {"tenant_id": tenant})
            rows = conn.cursor(row_factory=dict_row)
            await rows.execute(queries["balance"], {"tenant_id": tenant})
            row = await rows.fetchone()
        if row is None:
            raise e.PayerNotFound()
        grants = [
            GrantView(
                **{
                    **g,
                    "id": uuid.UUID(g["id"]),
                    "expires_at": _ts(g["expires_at"]),
                    "created_at": _ts(g["created_at"]),
                }
            )
            for g in row.pop("grants")
        ]
        return Balance(**row, grants=grants)

    async def ledger(
        self,
        *,
        tenant_id: uuid.UUID | None = None,
        user_id: uuid.UUID | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[LedgerEntry], str | None]:
        """Newest first; the second value is the cursor of the next page, if any."""
        tenant = await self.tenant_of(tenant_id, user_id)
        before_id = _decode_cursor(cursor) if cursor else None
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(LedgerEntry))
            await cur.execute(
                queries["ledger"],
                {"tenant_id": tenant, "before_id": before_id, "limit": limit + 1},
            )
            rows = await cur.fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1]) if more and rows else None
        return rows, next_cursor

    async def change_plan(
        self,
        plan: str,
        *,
        tenant_id: uuid.UUID | None = None,
        user_id: uuid.UUID | None = None,
    ) -> tuple[uuid.UUID, str, int, bool]:
        """Move an account to `plan` now, keeping the period's usage (the new allowance minus
        what the old one used). Returns (tenant, plan, balance, changed)."""
        async with self._db.connection(_CONSTRAINTS) as conn:
            cur = await conn.execute(
                queries["change_plan"], {"tenant_id": tenant_id, "user_id": user_id, "plan": plan}
            )
            row = await cur.fetchone()
        if row is None:
            raise e.PayerNotFound()
        return row[0], row[1], int(row[2]), bool(row[3])

    # --- plans and checks --------------------------------------------------------------------

    async def plans(self) -> list[Plan]:
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(Plan))
            await cur.execute(queries["plans"])
            return await cur.fetchall()

    async def set_plan(
        self, name: str, *, monthly_credits: int, daily_cap: int | None, overdraft_limit: int
    ) -> Plan:
        async with self._db.connection(_CONSTRAINTS) as conn:
            cur = conn.cursor(row_factory=class_row(Plan))
            await cur.execute(
                queries["set_plan"],
                {
                    "name": name,
                    "monthly_credits": monthly_credits,
                    "daily_cap": daily_cap,
                    "overdraft_limit": overdraft_limit,
                },
            )
            plan = await cur.fetchone()
        assert plan is not None
        return plan


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _encode_cursor(entry: LedgerEntry) -> str:
    return base64.urlsafe_b64encode(entry.id.bytes).decode().rstrip("=")


def _decode_cursor(cursor: str) -> uuid.UUID:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except ValueError as exc:
        raise e.InvalidRequest("the cursor is not one this API gave", field="cursor") from exc


async def conservation_problems(
    conn: psycopg.AsyncConnection[Any], tenant_id: uuid.UUID | None = None
) -> list[str]:
    """Accounts (all, or one) whose balance is not the sum of their ledger and of their
    live grants, or whose reserved amount is not their pending holds."""
    cur = await conn.execute(queries["conservation"], {"tenant_id": tenant_id})
    return [
        f"tenant {tenant}: balance {balance}, ledger {ledger_sum}, grants {remaining},"
        f" reserved {reserved}, pending holds {held}"
        for tenant, balance, ledger_sum, remaining, reserved, held in await cur.fetchall()
    ]


def _expiry(value: datetime | None) -> datetime | None:
    """A grant's expiry in UTC (a naive one is UTC), or `InvalidRequest` outside 1970-9999."""
    if value is None:
        return None
    try:
        utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:
        utc = None
    if utc is None or not FIRST_EXPIRY <= utc <= LAST_EXPIRY:
        raise e.InvalidRequest(
            "expires_at must be between 1970-01-01 and 9999-12-31 in UTC", field="expires_at"
        )
    return utc
