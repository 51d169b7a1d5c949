"""Group commit for debits (`tollhouse.db.group_commit`).

Debits that arrive while a call is in flight go together in the next call: one transaction,
one `credit_debit_batch_v1` call, each debit still decided on its own in arrival order.
Lanes are chosen by the payer, so a tenant's debits keep their order and two lanes never
fight over one account; the function locks accounts in tenant order, so lanes never
deadlock.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

from tollhouse.credits.records import DebitRequest, DebitResult
from tollhouse.db.group_commit import GroupCommit

Runner = Callable[[Sequence[DebitRequest]], Awaitable[list[DebitResult]]]


def _payer(request: DebitRequest) -> uuid.UUID:
    return request.tenant_id or request.user_id or uuid.UUID(int=0)


class DebitBatcher(GroupCommit[DebitRequest, DebitResult]):
    """Coalesces concurrent debits into as few transactions as the lanes allow."""

    def __init__(
        self, run_batch: Runner, run_one: Runner, *, lanes: int = 2, max_batch: int = 256
    ) -> None:
        super().__init__(run_batch, run_one, _payer, lanes=lanes, max_batch=max_batch, what="debit")
