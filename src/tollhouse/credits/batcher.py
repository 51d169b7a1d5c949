"""Group commit for debits.

A debit waiting alone goes straight to the database in one round trip. Debits that arrive
while a call is in flight wait in their lane and go together in the next call: one
transaction, one `credit_debit_batch_v1` call, each debit still decided on its own in
arrival order. Lanes are chosen by the payer, so a tenant's debits keep their order and two
lanes never fight over one account; the function locks accounts in tenant order, so lanes
never deadlock. A caller hears its outcome only after its batch committed.
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


class DebitBatcher:
    """Coalesces concurrent debits into as few transactions as the lanes allow."""

    def __init__(
        self, run_batch: Runner, run_one: Runner, *, lanes: int = 2, max_batch: int = 256
    ) -> None:
        self._run_batch = run_batch
        self._run_one = run_one
        self._max_batch = max_batch
        self._queues: list[deque[Item]] = [deque() for _ in range(lanes)]
        self._wakeups = [asyncio.Event() for _ in range(lanes)]
        self._workers: list[asyncio.Task[None] | None] = [None] * lanes
        self._closed = False
        #: Batches and debits sent, for metrics and benchmarks.
        self.batches = 0
        self.debits = 0

    def _lane(self, request: DebitRequest) -> int:
        payer = request.tenant_id or request.user_id or uuid.UUID(int=0)
        return payer.int % len(self._queues)

    async def submit(self, request: DebitRequest) -> DebitResult:
        """The debit's outcome, once the transaction that decided it committed."""
        if self._closed:
            raise ServiceStopping()
        lane = self._lane(request)
        future: asyncio.Future[DebitResult] = asyncio.get_running_loop().create_future()
        self._queues[lane].append((request, future))
        worker = self._workers[lane]
        if worker is None or worker.done():
            self._workers[lane] = asyncio.create_task(self._work(lane))
        self._wakeups[lane].set()
        return await future

    async def _work(self, lane: int) -> None:
        queue, wakeup = self._queues[lane], self._wakeups[lane]
        while True:
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
                try:
                    await self._send(batch)
                finally:
                    # Whatever happened, no caller is left waiting without an answer.
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(DatabaseUnavailable("the debit was not sent"))
            if self._closed:
                return
            wakeup.clear()
            await wakeup.wait()

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
        for wakeup in self._wakeups:
            wakeup.set()
        workers = [w for w in self._workers if w is not None]
        await asyncio.gather(*workers, return_exceptions=True)
