"""Group commit for debits (`tollhouse.db.group_commit`), keyed by the payer.

Debits that arrive while calls are in flight go together in the next call: one
transaction, one `credit_debit_batch_v1` call, each debit still decided on its own in
arrival order. A payer is in one call at a time, so a tenant's debits keep their order and
two calls never fight over one account; the function locks accounts in tenant order, so
calls never deadlock.

Debits spread: what waits is shared among the free lanes, so two calls run side by side
(the database works on both at once, one per core) instead of one call taking everything
while a lane stays idle. A hot payer still goes as one call, as big as its queue.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

from tollhouse.credits.records import DebitRequest, DebitResult
from tollhouse.db.group_commit import GroupCommit

#: The smallest share of a spread. Two calls side by side beat one call of all at every crowd
#: measured, 8 and 16 debits included (docs/credits.md has the measurement).
SPREAD_MIN = 1

Runner = Callable[[Sequence[DebitRequest]], Awaitable[list[DebitResult]]]


def _payer(request: DebitRequest) -> uuid.UUID:
    return request.tenant_id or request.user_id or uuid.UUID(int=0)


class DebitBatcher(GroupCommit[DebitRequest, DebitResult]):
    """Coalesces concurrent debits into as few transactions as the lanes allow."""

    def __init__(
        self,
        run_batch: Runner,
        run_one: Runner,
        *,
        lanes: int = 2,
        max_batch: int = 256,
        spread: bool = True,
        spread_min: int = SPREAD_MIN,
    ) -> None:
        super().__init__(
            run_batch,
            run_one,
            _payer,
            lanes=lanes,
            max_batch=max_batch,
            what="debit",
            spread=spread,
            spread_min=spread_min,
        )
