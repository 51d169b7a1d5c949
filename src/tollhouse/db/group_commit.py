"""Group commit: requests that arrive while a transaction is in flight go together in the
next one.

A request waiting alone is sent at once (one round trip, no added delay). Requests that
arrive while calls are in flight wait in one queue; when a call comes back (or a lane is
free), everything waiting goes together in the next call, each request still decided on
its own, in arrival order. Up to `lanes` calls are in flight at once. A key (the payer of a
debit, the customer of a webhook event) is in at most one of them: its later requests wait
for the call that has its earlier ones, so one key's requests are decided in arrival order
and two calls never work on the same key at once (a hot key makes one call at a time, as
big as its queue). A caller hears its outcome only after the call that decided it returned,
that is, after its transaction committed. If a batch call fails, its requests are sent
again one by one, so one bad request never fails its neighbours.

The queue is cut on the event loop's next turn rather than at once, so that the callers a
returning call woke have all queued their next requests before the next batch is cut: no
added delay, and the batch takes them all instead of splitting them.
"""

from __future__ import annotations

import asyncio
import functools
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
        spread: bool = False,
        spread_min: int = 1,
    ) -> None:
        self._run_batch = run_batch
        self._run_one = run_one
        self._key = key
        self._lanes = lanes
        self._max_batch = max_batch
        self._what = what
        self._spread = spread
        self._spread_min = max(1, spread_min)
        self._queue: deque[tuple[Req, asyncio.Future[Res]]] = deque()
        self._busy: set[Hashable] = set()  # keys with a call in flight
        self._calls: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._closed = False
        self._drained = asyncio.Event()
        #: Batches and requests sent, for metrics and benchmarks.
        self.batches = 0
        self.requests = 0

    async def submit(self, request: Req) -> Res:
        """The request's outcome, once the transaction that decided it committed."""
        if self._closed:
            raise ServiceStopping()
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Start calls while a lane is free and some queued request's key is not busy."""
        self._scheduled = False
        while len(self._calls) < self._lanes and self._queue:
            size = self._max_batch
            if self._spread:
                # What waits is shared among the free lanes, to run side by side, in parts of
                # at least `spread_min` (a smaller part costs more than the lane it fills).
                parts = min(self._lanes - len(self._calls), len(self._queue) // self._spread_min)
                size = min(size, -(-len(self._queue) // max(1, parts)))
            batch, keys = self._cut(size)
            if not batch:
                break  # every queued key has a call in flight; its return dispatches again
            self._busy |= keys
            call = asyncio.get_running_loop().create_task(self._send(batch))
            call.add_done_callback(functools.partial(self._finished, batch, keys))
            self._calls.add(call)
        if not self._calls and not self._queue:
            self._drained.set()

    def _cut(self, size: int) -> tuple[list[tuple[Req, asyncio.Future[Res]]], set[Hashable]]:
        """The next batch and its keys: up to `size` queued requests whose key is not busy,
        in arrival order, with the other queued requests of the keys it takes (up to the
        maximum batch); the others keep their place."""
        batch: list[tuple[Req, asyncio.Future[Res]]] = []
        kept: deque[tuple[Req, asyncio.Future[Res]]] = deque()
        taken: set[Hashable] = set()
        queue = self._queue
        while queue and len(batch) < self._max_batch:
            item = queue.popleft()
            key = self._key(item[0])
            if key in self._busy or (len(batch) >= size and key not in taken):
                kept.append(item)
            else:
                batch.append(item)
                taken.add(key)
        kept.extend(queue)
        self._queue = kept
        return batch, taken

    def _finished(
        self,
        batch: list[tuple[Req, asyncio.Future[Res]]],
        keys: set[Hashable],
        call: asyncio.Task[None],
    ) -> None:
        """A call ended. Whatever happened (an error, even a cancellation before it began),
        no caller is left waiting without an answer and its keys are free again."""
        for _, future in batch:
            if not future.done():
                future.set_exception(DatabaseUnavailable(f"the {self._what} was not sent"))
        self._busy -= keys
        self._calls.discard(call)
        self._schedule()

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
        while self._calls or self._queue:
            self._drained.clear()
            self._schedule()
            await self._drained.wait()
