"""Credits over HTTP (service key): debits, balances, grants, the ledger, plans."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt, model_validator

from tollhouse.api.deps import ServiceKey, TollhouseDep
from tollhouse.api.errors import envelope, status_for
from tollhouse.api.schemas import Strict
from tollhouse.app import Tollhouse
from tollhouse.credits import DebitRequest, DebitResult, rejection
from tollhouse.credits.service import MAX_ADJUSTMENT_ID, MAX_AMOUNT
from tollhouse.errors import InvalidRequest

router = APIRouter(prefix="/v1", tags=["credits"])

Amount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT)]
REPLAY_HEADER = "Idempotent-Replayed"


class Payer(Strict):
    user_id: uuid.UUID | None = None
    tenant_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _one_payer(self) -> Payer:
        if self.user_id is None and self.tenant_id is None:
            raise ValueError("name the payer: user_id or tenant_id")
        return self


class DebitBody(Payer):
    amount: Amount
    turn_id: str = Field(min_length=1, max_length=200)
    session_id: str | None = Field(default=None, max_length=200)
    reason: str = Field(default="llm_usage", pattern=r"^[a-z][a-z0-9_.:-]{0,63}$")
    metadata: dict[str, Any] = Field(default_factory=dict)


class DebitOut(BaseModel):
    ledger_id: uuid.UUID
    tenant_id: uuid.UUID
    amount: int
    balance_after: int
    status: Literal["applied"]


class GrantBody(Payer):
    amount: Amount
    source: Literal["purchase", "promo", "adjustment", "import"]
    priority: StrictInt = Field(default=0, ge=-1000, le=1000)
    expires_at: datetime | None = None
    source_id: str | None = Field(default=None, min_length=1, max_length=200)


class AdjustmentBody(Payer):
    amount: Annotated[StrictInt, Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT)] = Field(
        description="Credits to add (> 0) or take (< 0); never 0"
    )
    adjustment_id: str = Field(
        min_length=1, max_length=MAX_ADJUSTMENT_ID, description="Applies once"
    )
    note: str = Field(min_length=1, max_length=500, pattern=r"\S", description="Why")


class AdjustmentOut(BaseModel):
    tenant_id: uuid.UUID
    ledger_id: uuid.UUID
    amount: int
    balance_after: int
    replayed: bool


class TimeZoneBody(Payer):
    time_zone: str = Field(min_length=1, max_length=64, examples=["Europe/Paris"])


class GrantOut(BaseModel):
    tenant_id: uuid.UUID
    grant_id: uuid.UUID
    balance_after: int
    replayed: bool


class GrantItem(BaseModel):
    id: uuid.UUID
    source: str
    source_id: str | None
    total: int
    remaining: int
    priority: int
    expires_at: datetime | None
    created_at: datetime


class BalanceOut(BaseModel):
    tenant_id: uuid.UUID
    balance: int
    available: int
    plan: str
    daily_cap: int | None
    daily_used: int
    overdraft: int
    overdraft_limit: int
    period_start: datetime
    period_end: datetime
    time_zone: str = Field(description="Where the account's day (its daily cap) starts")
    grants: list[GrantItem]


class LedgerItem(BaseModel):
    id: uuid.UUID
    kind: str
    reason: str
    delta: int
    balance_after: int
    turn_id: str | None
    session_id: str | None
    acting_user_id: uuid.UUID | None
    grant_id: uuid.UUID | None
    metadata: dict[str, Any]
    created_at: datetime


class LedgerOut(BaseModel):
    entries: list[LedgerItem]
    next_cursor: str | None


class PlanOut(BaseModel):
    name: str
    monthly_credits: int
    daily_cap: int | None
    overdraft_limit: int
    updated_at: datetime


class PlanList(BaseModel):
    plans: list[PlanOut]


class PlanBody(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    monthly_credits: StrictInt = Field(ge=0, le=MAX_AMOUNT)
    daily_cap: StrictInt | None = Field(default=None, gt=0, le=MAX_AMOUNT)
    overdraft_limit: StrictInt = Field(default=0, ge=0, le=MAX_AMOUNT)


class PlansBody(Strict):
    plans: list[PlanBody] = Field(min_length=1, max_length=100)


class ReserveBody(Payer):
    amount: Amount
    turn_id: str = Field(min_length=1, max_length=200)
    ttl_seconds: StrictInt = Field(default=600, ge=1, le=7 * 24 * 3600)
    session_id: str | None = Field(default=None, max_length=200)


class ReservationOut(BaseModel):
    tenant_id: uuid.UUID
    turn_id: str
    amount: int
    status: str
    available_after: int | None


class CommitBody(Payer):
    amount: StrictInt = Field(ge=0, le=MAX_AMOUNT)
    reason: str = Field(default="llm_usage", pattern=r"^[a-z][a-z0-9_.:-]{0,63}$")
    metadata: dict[str, Any] = Field(default_factory=dict)


class RefundBody(Strict):
    ledger_id: uuid.UUID
    amount: Amount | None = Field(
        default=None, description="The total to have refunded of this debit; default: all."
    )


class RefundOut(BaseModel):
    tenant_id: uuid.UUID
    ledger_id: uuid.UUID
    refunded: int
    balance_after: int


def _answer(result: DebitResult, out: BaseModel | None) -> Response:
    """A result as HTTP: its error envelope when rejected, else `out`; replays marked."""
    headers = {REPLAY_HEADER: "true"} if result.replayed else {}
    error = rejection(result)
    if error is not None:
        fields = {k: v for k, v in error.fields.items() if v is not None}
        return JSONResponse(
            envelope(error.code, error.message, **fields),
            status_code=status_for(error),
            headers=headers,
        )
    assert out is not None
    return JSONResponse(out.model_dump(mode="json"), headers=headers)


def _debit_out(result: DebitResult) -> DebitOut | None:
    if result.status != "applied" or result.ledger_id is None or result.tenant_id is None:
        return None
    return DebitOut(
        ledger_id=result.ledger_id,
        tenant_id=result.tenant_id,
        amount=result.amount,
        balance_after=result.balance_after or 0,
        status="applied",
    )


def _reservation_out(result: DebitResult, turn_id: str) -> ReservationOut | None:
    """A hold's state as HTTP (pending, released, or committed with nothing to debit)."""
    if result.status == "rejected" or result.tenant_id is None:
        return None
    return ReservationOut(
        tenant_id=result.tenant_id,
        turn_id=turn_id,
        amount=result.amount,
        status=result.status,
        available_after=result.balance_after,
    )


def _payer_args(body: Payer) -> dict[str, uuid.UUID | None]:
    """With `tenant_id`, `user_id` names the acting member (recorded on the ledger)."""
    return {"tenant_id": body.tenant_id, "user_id": body.user_id}


def _require_payer(user_id: uuid.UUID | None, tenant_id: uuid.UUID | None) -> None:
    if user_id is None and tenant_id is None:
        raise InvalidRequest("name the payer: user_id or tenant_id", field="user_id")


_DEBIT_ERRORS: dict[int | str, dict[str, Any]] = {
    402: {"description": "insufficient_credits"},
    404: {"description": "payer_not_found"},
    409: {"description": "idempotency_conflict"},
    429: {"description": "daily_cap_exceeded"},
}


@router.post(
    "/credits/debit",
    response_model=DebitOut,
    responses=_DEBIT_ERRORS,
    summary="Debit credits for one turn (idempotent per turn_id)",
)
async def debit(body: DebitBody, _: ServiceKey, tollhouse: TollhouseDep) -> Response:
    return await run_debit(tollhouse, body)


async def run_debit(tollhouse: Tollhouse, body: DebitBody) -> Response:
    """A validated debit body, debited, as its HTTP answer (the route's, and the short
    path's in `tollhouse.api.debit`)."""
    result = await tollhouse.credits.debit(
        DebitRequest(
            amount=body.amount,
            turn_id=body.turn_id,
            session_id=body.session_id,
            reason=body.reason,
            metadata=body.metadata,
            **_payer_args(body),
        )
    )
    return _answer(result, _debit_out(result))


@router.get(
    "/credits/balance",
    response_model=BalanceOut,
    summary="A payer's balance and grants",
    responses={404: {"description": "payer_not_found"}},
)
async def balance(
    _: ServiceKey,
    tollhouse: TollhouseDep,
    user_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
) -> BalanceOut:
    _require_payer(user_id, tenant_id)
    found = await tollhouse.credits.balance(tenant_id=tenant_id, user_id=user_id)
    return BalanceOut.model_validate(found, from_attributes=True)


@router.post(
    "/credits/grants",
    response_model=GrantOut,
    summary="Grant credits",
    responses={409: {"description": "idempotency_conflict"}},
)
async def grant(body: GrantBody, _: ServiceKey, tollhouse: TollhouseDep) -> GrantOut:
    result = await tollhouse.credits.grant(
        amount=body.amount,
        source=body.source,
        tenant_id=body.tenant_id,
        user_id=body.user_id,
        source_id=body.source_id,
        priority=body.priority,
        expires_at=body.expires_at,
    )
    return GrantOut.model_validate(result, from_attributes=True)


@router.get("/credits/ledger", response_model=LedgerOut, summary="A payer's ledger, newest first")
async def ledger(
    _: ServiceKey,
    tollhouse: TollhouseDep,
    user_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> LedgerOut:
    _require_payer(user_id, tenant_id)
    entries, next_cursor = await tollhouse.credits.ledger(
        tenant_id=tenant_id, user_id=user_id, limit=limit, cursor=cursor
    )
    return LedgerOut(
        entries=[LedgerItem.model_validate(x, from_attributes=True) for x in entries],
        next_cursor=next_cursor,
    )


@router.get("/plans", response_model=PlanList, summary="The plans")
async def list_plans(_: ServiceKey, tollhouse: TollhouseDep) -> PlanList:
    plans = await tollhouse.credits.plans()
    return PlanList(plans=[PlanOut.model_validate(p, from_attributes=True) for p in plans])


@router.put("/plans", response_model=PlanList, summary="Create or change plans")
async def put_plans(body: PlansBody, _: ServiceKey, tollhouse: TollhouseDep) -> PlanList:
    for plan in body.plans:
        await tollhouse.credits.set_plan(
            plan.name,
            monthly_credits=plan.monthly_credits,
            daily_cap=plan.daily_cap,
            overdraft_limit=plan.overdraft_limit,
        )
    plans = await tollhouse.credits.plans()
    return PlanList(plans=[PlanOut.model_validate(p, from_attributes=True) for p in plans])


@router.post(
    "/credits/reservations",
    response_model=ReservationOut,
    responses=_DEBIT_ERRORS,
    summary="Hold credits for a streaming turn",
)
async def reserve(body: ReserveBody, _: ServiceKey, tollhouse: TollhouseDep) -> Response:
    result = await tollhouse.credits.reserve(
        amount=body.amount,
        turn_id=body.turn_id,
        ttl_seconds=body.ttl_seconds,
        session_id=body.session_id,
        **_payer_args(body),
    )
    return _answer(result, _reservation_out(result, body.turn_id))


@router.post(
    "/credits/reservations/{turn_id}/commit",
    response_model=DebitOut,
    responses=_DEBIT_ERRORS,
    summary="Debit the actual amount of a held turn; the rest goes back",
)
async def commit(
    turn_id: str, body: CommitBody, _: ServiceKey, tollhouse: TollhouseDep
) -> Response:
    result = await tollhouse.credits.commit(
        turn_id=turn_id,
        amount=body.amount,
        reason=body.reason,
        metadata=body.metadata,
        **_payer_args(body),
    )
    if result.status == "committed":  # a commit of 0: nothing to debit
        return _answer(result, _reservation_out(result, turn_id))
    return _answer(result, _debit_out(result))


@router.post(
    "/credits/reservations/{turn_id}/release",
    response_model=ReservationOut,
    summary="Give a held turn's credits back",
)
async def release(turn_id: str, body: Payer, _: ServiceKey, tollhouse: TollhouseDep) -> Response:
    result = await tollhouse.credits.release(turn_id=turn_id, **_payer_args(body))
    return _answer(result, _reservation_out(result, turn_id))


@router.post(
    "/credits/refunds",
    response_model=RefundOut,
    summary="Refund a debit (amount: the total to have refunded; repeats change nothing)",
    responses={404: {"description": "ledger_entry_not_found"}},
)
async def refund(body: RefundBody, _: ServiceKey, tollhouse: TollhouseDep) -> RefundOut:
    tenant, refunded, balance_after = await tollhouse.credits.refund(
        body.ledger_id, total=body.amount
    )
    return RefundOut(
        tenant_id=tenant, ledger_id=body.ledger_id, refunded=refunded, balance_after=balance_after
    )


@router.post(
    "/credits/adjustments",
    response_model=AdjustmentOut,
    summary="An admin correction either way, with a note (once per adjustment_id)",
    responses={402: {"description": "insufficient_credits: it would break the floor"}},
)
async def adjust(body: AdjustmentBody, _: ServiceKey, tollhouse: TollhouseDep) -> Response:
    result = await tollhouse.credits.adjust(
        amount=body.amount,
        adjustment_id=body.adjustment_id,
        note=body.note,
        **_payer_args(body),
    )
    failure = rejection(result)
    if failure is not None:
        raise failure
    assert result.tenant_id is not None and result.ledger_id is not None
    assert result.balance_after is not None
    out = AdjustmentOut(
        tenant_id=result.tenant_id,
        ledger_id=result.ledger_id,
        amount=result.amount,
        balance_after=result.balance_after,
        replayed=result.replayed,
    )
    return JSONResponse(out.model_dump(mode="json"))


@router.put(
    "/credits/time-zone",
    response_model=BalanceOut,
    summary="Set where a payer's day (its daily cap) starts: an IANA time zone",
)
async def set_time_zone(body: TimeZoneBody, _: ServiceKey, tollhouse: TollhouseDep) -> BalanceOut:
    found = await tollhouse.credits.set_time_zone(body.time_zone, **_payer_args(body))
    return BalanceOut.model_validate(found, from_attributes=True)
