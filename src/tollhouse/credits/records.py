"""Credit records: frozen dataclasses built from rows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class DebitRequest:
    """One debit as the caller asked for it; `tenant_id` or `user_id` names the payer."""

    amount: int
    turn_id: str
    tenant_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None
    session_id: str | None = None
    reason: str = "llm_usage"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DebitResult:
    """The outcome of a debit; `replayed` when it is the stored first outcome of the turn."""

    tenant_id: uuid.UUID | None
    status: str
    code: str | None
    ledger_id: uuid.UUID | None
    amount: int
    balance_after: int | None
    replayed: bool


@dataclass(frozen=True)
class GrantView:
    id: uuid.UUID
    source: str
    source_id: str | None
    total: int
    remaining: int
    priority: int
    expires_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class Balance:
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
    time_zone: str
    grants: list[GrantView]


@dataclass(frozen=True)
class GrantResult:
    tenant_id: uuid.UUID
    grant_id: uuid.UUID
    balance_after: int
    replayed: bool


@dataclass(frozen=True)
class LedgerEntry:
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


@dataclass(frozen=True)
class Plan:
    name: str
    monthly_credits: int
    daily_cap: int | None
    overdraft_limit: int
    updated_at: datetime
