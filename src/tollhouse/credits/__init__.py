"""Credits: plans, grants, an idempotent ledger, daily caps, overdraft, group commit."""

from tollhouse.credits.records import (
    Balance,
    DebitRequest,
    DebitResult,
    GrantResult,
    GrantView,
    LedgerEntry,
    Plan,
)
from tollhouse.credits.service import CreditService, conservation_problems, rejection

__all__ = [
    "Balance",
    "CreditService",
    "DebitRequest",
    "DebitResult",
    "GrantResult",
    "GrantView",
    "LedgerEntry",
    "Plan",
    "conservation_problems",
    "rejection",
]
