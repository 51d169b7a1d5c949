"""Group commit: requests that arrive while a transaction is in flight go together in the
next one.

A request waiting alone is sent at once (no added delay). Requests that arrive while a call
is in flight wait in their lane and go together in the next call, each still decided on
its own, in arrival order. The lane is chosen by a key (the payer of a debit, the customer
of a webhook event), so one key's requests keep their order and two lanes never work on
the same key at once. A caller hears its outcome only after the call that decided it
returned, that is, after its transaction committed. If a batch call fails, its requests
are sent again one by one, so one bad request never fails its neighbours.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

import structlog

from tollhouse.errors import DatabaseUnavailable, ServiceStopping, TollhouseError

log = structlog.get_logger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")


class GroupCommit(Generic[Req, Res]):
    """Coalesces concurrent requests into as few calls (transactions) as the lanes allow."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Req]], Awaitable[list[Res]]],
        run_one: Callable[[Sequence[Req]], Awaitable[list[Res]]],
        key: Callable[[Req], Hashable],
        *,
        lanes: int = 2,
        max_batch: int = 256,
        what: str = "request",
    ) -> None:
        self._run_batch = run_batch
        self._run_one = run_one
        self._key = key
        self._max_batch = max_batch
        self._what = what
        self._queues: list[deque[tuple[Req, asyncio.Future[Res]]]] = [deque() for _ in range(lanes)]
        self._wakeups = [asyncio.Event() for _ in range(lanes)]
        self._workers: list[asyncio.Task[None] | None] = [None] * lanes
        self._closed = False
        #: Batches and requests sent, for metrics and benchmarks.
        self.batches = 0
        self.requests = 0

    def _lane(self, request: Req) -> int:
        return hash(self._key(request)) % len(self._queues)

    async def submit(self, request: Req) -> Res:
        """The request's outcome, once the transaction that decided it committed."""
        if self._closed:
            raise ServiceStopping()
        lane = self._lane(request)
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
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
                            future.set_exception(
                                DatabaseUnavailable(f"the {self._what} was not sent")
                            )
            if self._closed:
                return
            wakeup.clear()
            await wakeup.wait()

    async def _send(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        requests = [request for request, _ in batch]
        self.batches += 1
        self.requests += len(batch)
        runner = self._run_one if len(batch) == 1 else self._run_batch
        try:
            results = await runner(requests)
            if len(results) != len(batch):
                raise TollhouseError(f"{len(results)} outcomes for {len(batch)} {self._what}s")
        except DatabaseUnavailable as exc:
            # The database is away: fail fast, every request of the batch alike.
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:
            if len(batch) > 1:
                log.warning(
                    "group_commit_batch_failed_retrying_alone",
                    what=self._what,
                    size=len(batch),
                    error=str(exc),
                )
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
        """Take no more requests; those queued or in flight are still sent and answered."""
        self._closed = True
        for wakeup in self._wakeups:
            wakeup.set()
        workers = [w for w in self._workers if w is not None]
        await asyncio.gather(*workers, return_exceptions=True)
