"""Group commit for debits.

A debit waiting alone goes straight to the database in one round trip. Debits that arrive
while calls are in flight wait in one queue; when a call comes back (or a lane is free),
everything waiting goes together in the next call: one transaction, one
`credit_debit_batch_v1` call, each debit still decided on its own in arrival order.

Up to `lanes` calls are in flight at once. A payer is in at most one of them: its later
debits wait for the call that has its earlier ones, so a tenant's debits are decided in
arrival order and two calls never fight over one account (a hot tenant makes one call at a
time, as big as its queue). The function locks accounts in tenant order, so calls never
deadlock. A caller hears its outcome only after its batch committed.

The queue is read on the event loop's next turn rather than at once, so that the callers
woken by a returning batch have all queued their next debits before the next batch is cut:
no added delay, and the batch takes them all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import structlog

from tollhouse.credits.records import DebitRequest, DebitResult
from tollhouse.errors import DatabaseUnavailable, ServiceStopping, TollhouseError

log = structlog.get_logger(__name__)

Runner = Callable[[Sequence[DebitRequest]], Awaitable[list[DebitResult]]]
Item = tuple[DebitRequest, "asyncio.Future[DebitResult]"]


def _payer(request: DebitRequest) -> uuid.UUID:
    return request.tenant_id or request.user_id or uuid.UUID(int=0)


class DebitBatcher:
    """Coalesces concurrent debits into as few transactions as the lanes allow."""

    def __init__(
        self, run_batch: Runner, run_one: Runner, *, lanes: int = 2, max_batch: int = 256
    ) -> None:
        self._run_batch = run_batch
        self._run_one = run_one
        self._lanes = lanes
        self._max_batch = max_batch
        self._queue: deque[Item] = deque()
        self._busy: set[uuid.UUID] = set()  # payers with a call in flight
        self._calls: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._closed = False
        self._drained = asyncio.Event()
        #: Batches and debits sent, for metrics and benchmarks.
        self.batches = 0
        self.debits = 0

    async def submit(self, request: DebitRequest) -> DebitResult:
        """The debit's outcome, once the transaction that decided it committed."""
        if self._closed:
            raise ServiceStopping()
        future: asyncio.Future[DebitResult] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Start calls while a lane is free and some queued debit's payer is not busy."""
        self._scheduled = False
        while len(self._calls) < self._lanes and self._queue:
            batch = self._cut()
            if not batch:
                break  # every queued payer has a call in flight; its return dispatches again
            payers = {_payer(request) for request, _ in batch}
            self._busy |= payers
            call = asyncio.get_running_loop().create_task(self._call(batch, payers))
            self._calls.add(call)
        if not self._calls and not self._queue:
            self._drained.set()

    def _cut(self) -> list[Item]:
        """The next batch: queued debits of payers not busy, in arrival order; the others
        keep their place."""
        batch: list[Item] = []
        kept: deque[Item] = deque()
        queue = self._queue
        while queue and len(batch) < self._max_batch:
            item = queue.popleft()
            (batch if _payer(item[0]) not in self._busy else kept).append(item)
        kept.extend(queue)
        self._queue = kept
        return batch

    async def _call(self, batch: list[Item], payers: set[uuid.UUID]) -> None:
        try:
            await self._send(batch)
        finally:
            # Whatever happened, no caller is left waiting without an answer.
            for _, future in batch:
                if not future.done():
                    future.set_exception(DatabaseUnavailable("the debit was not sent"))
            self._busy -= payers
            task = asyncio.current_task()
            if task is not None:
                self._calls.discard(task)
            self._schedule()

    async def _send(self, batch: list[Item]) -> None:
        requests = [request for request, _ in batch]
        self.batches += 1
        self.debits += len(batch)
        runner = self._run_one if len(batch) == 1 else self._run_batch
        try:
            results = await runner(requests)
            if len(results) != len(batch):
                raise TollhouseError(f"{len(results)} outcomes for {len(batch)} debits")
        except DatabaseUnavailable as exc:
            # The database is away: fail fast, every debit of the batch alike.
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:
            if len(batch) > 1:
                log.warning("debit_batch_failed_retrying_alone", size=len(batch), error=str(exc))
                for item in batch:
                    await self._send([item])
                return
            _, future = batch[0]
            if not future.done():
                future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        """Take no more debits; those queued or in flight are still sent and answered."""
        self._closed = True
        while self._calls or self._queue:
            self._drained.clear()
            self._schedule()
            await self._drained.wait()
