"""The group-commit batcher's promises, with runners standing in for the database call."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence

import pytest

from tollhouse.credits.batcher import DebitBatcher
from tollhouse.credits.records import DebitRequest, DebitResult
from tollhouse.db.group_commit import GroupCommit
from tollhouse.errors import DatabaseUnavailable, ServiceStopping

TENANT = uuid.UUID(int=7)


def _ok(request: DebitRequest) -> DebitResult:
    return DebitResult(TENANT, "applied", None, uuid.uuid4(), request.amount, 0, False)


def _request(n: int) -> DebitRequest:
    return DebitRequest(amount=n, turn_id=f"t{n}", tenant_id=TENANT)


class Recorder:
    def __init__(
        self, delay: float = 0.01, fail_on: int | None = None, error: Exception | None = None
    ) -> None:
        self.calls: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.error = error

    async def __call__(self, requests: Sequence[DebitRequest]) -> list[DebitResult]:
        self.calls.append([r.amount for r in requests])
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        if self.fail_on is not None and any(r.amount == self.fail_on for r in requests):
            raise ValueError("bad debit")
        return [_ok(r) for r in requests]


async def test_a_lone_debit_goes_at_once_and_later_ones_coalesce_in_order() -> None:
    runner = Recorder()
    batcher = DebitBatcher(runner, runner, lanes=1)
    first = asyncio.create_task(batcher.submit(_request(1)))
    await asyncio.sleep(0)  # the first is on its way alone
    rest = [asyncio.create_task(batcher.submit(_request(n))) for n in range(2, 12)]
    results = await asyncio.gather(first, *rest)
    assert [r.amount for r in results] == list(range(1, 12))
    assert runner.calls == [[1], list(range(2, 12))]  # arrival order kept
    await batcher.close()


async def test_one_bad_debit_does_not_fail_its_neighbours() -> None:
    runner = Recorder(fail_on=5)
    batcher = DebitBatcher(runner, runner, lanes=1)
    blocker = asyncio.create_task(batcher.submit(_request(100)))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(batcher.submit(_request(n))) for n in range(1, 9)]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    await blocker
    assert [isinstance(o, ValueError) for o in outcomes] == [n == 5 for n in range(1, 9)]
    await batcher.close()


async def test_a_database_outage_fails_the_batch_fast() -> None:
    runner = Recorder(error=DatabaseUnavailable("down"))
    batcher = DebitBatcher(runner, runner, lanes=1)
    outcomes = await asyncio.gather(
        *(batcher.submit(_request(n)) for n in range(1, 6)), return_exceptions=True
    )
    assert all(isinstance(o, DatabaseUnavailable) for o in outcomes)
    assert len(runner.calls) <= 2  # no retry of each debit alone
    await batcher.close()


async def test_close_answers_what_is_in_flight_and_refuses_new_debits() -> None:
    runner = Recorder(delay=0.05)
    batcher = DebitBatcher(runner, runner, lanes=1)
    in_flight = [asyncio.create_task(batcher.submit(_request(n))) for n in range(1, 4)]
    await asyncio.sleep(0.01)
    await batcher.close()
    assert [t.result().amount for t in in_flight] == [1, 2, 3]
    with pytest.raises(ServiceStopping):
        await batcher.submit(_request(9))


async def test_a_short_answer_fails_the_callers_instead_of_hanging() -> None:
    async def short(requests: Sequence[DebitRequest]) -> list[DebitResult]:
        return [_ok(requests[0])] if len(requests) > 1 else []

    batcher = DebitBatcher(short, short, lanes=1)
    outcome = await asyncio.wait_for(
        asyncio.gather(batcher.submit(_request(1)), return_exceptions=True), timeout=2
    )
    assert isinstance(outcome[0], Exception)
    await batcher.close()


async def test_a_busy_payer_waits_while_others_take_the_free_lane() -> None:
    """Two lanes: a payer is never in two calls at once (its later debits wait for the call
    with its earlier ones and then go together, in order), while another payer's debit
    takes the free lane at once."""
    other = uuid.UUID(int=8)
    runner = Recorder(delay=0.05)
    batcher = DebitBatcher(runner, runner, lanes=2)
    first = asyncio.create_task(batcher.submit(_request(1)))
    await asyncio.sleep(0.01)  # TENANT's call is in flight
    later = [asyncio.create_task(batcher.submit(_request(n))) for n in (2, 3)]
    elsewhere = asyncio.create_task(
        batcher.submit(DebitRequest(amount=50, turn_id="o", tenant_id=other))
    )
    await asyncio.sleep(0.01)
    assert runner.calls == [[1], [50]]  # the other payer did not wait for TENANT's call
    await asyncio.gather(first, *later, elsewhere)
    assert runner.calls == [[1], [50], [2, 3]]
    await batcher.close()


async def test_each_payers_debits_keep_arrival_order_across_lanes() -> None:
    """Many payers, four lanes, random arrivals: every call holds a payer at most once in
    flight, and each payer's debits reach the database in the order they were submitted."""
    payers = [uuid.UUID(int=n) for n in range(1, 6)]
    in_flight: set[uuid.UUID] = set()
    seen: dict[uuid.UUID, list[int]] = {p: [] for p in payers}

    async def runner(requests: Sequence[DebitRequest]) -> list[DebitResult]:
        mine = {r.tenant_id for r in requests if r.tenant_id}
        assert not mine & in_flight  # a payer is in one call at a time
        in_flight.update(mine)
        for r in requests:
            assert r.tenant_id is not None
            seen[r.tenant_id].append(r.amount)
        await asyncio.sleep(0.002 * len(requests) ** 0.5)
        in_flight.difference_update(mine)
        return [_ok(r) for r in requests]

    batcher = DebitBatcher(runner, runner, lanes=4)
    rng = random.Random(3)
    submitted: dict[uuid.UUID, list[int]] = {p: [] for p in payers}
    tasks = []
    for n in range(1, 401):
        payer = rng.choice(payers)
        submitted[payer].append(n)
        tasks.append(
            asyncio.create_task(
                batcher.submit(DebitRequest(amount=n, turn_id=f"t{n}", tenant_id=payer))
            )
        )
        if rng.random() < 0.2:
            await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)
    assert seen == submitted
    assert batcher.batches < 400  # they did coalesce
    await batcher.close()


async def _steady_crowd(batcher: DebitBatcher, callers: int) -> None:
    """`callers` callers on as many payers, each sending 30 debits, the next as soon as it
    has the answer to the last."""

    async def caller(n: int) -> None:
        payer = uuid.UUID(int=100 + n)
        for k in range(30):
            await batcher.submit(DebitRequest(amount=1, turn_id=f"{n}-{k}", tenant_id=payer))

    await asyncio.gather(*(caller(n) for n in range(callers)))


async def test_callers_woken_by_a_returning_call_go_together_in_the_next_one() -> None:
    """16 callers on 16 payers, each sending its next debit as soon as it has its answer,
    over two lanes: the callers a returning call wakes are all queued before the next call
    is cut, so the calls stay as big as the crowd (payer lanes made half-size calls). Without
    `spread`, the crowd goes as one call."""
    runner = Recorder(delay=0.005)
    batcher = DebitBatcher(runner, runner, lanes=2, spread=False)
    await _steady_crowd(batcher, 16)
    assert batcher.requests == 16 * 30
    assert batcher.requests / batcher.batches >= 12
    await batcher.close()


async def test_with_spread_a_steady_crowd_of_32_goes_as_two_half_calls() -> None:
    """A crowd of 32 with `spread` (the default): both lanes busy with calls of about half
    the crowd each, never calls of one or two that would cost a round trip per debit."""
    runner = Recorder(delay=0.005)
    batcher = DebitBatcher(runner, runner, lanes=2)
    await _steady_crowd(batcher, 32)
    assert batcher.requests == 32 * 30
    assert 12 <= batcher.requests / batcher.batches <= 20
    await batcher.close()


async def test_a_call_cancelled_before_it_ran_answers_its_callers_and_frees_the_payer() -> None:
    """A call task cancelled from outside (even before its first step): its callers get an
    error instead of waiting forever, and the payer's later debits still go."""
    runner = Recorder(delay=0.05)
    batcher = DebitBatcher(runner, runner, lanes=1)
    first = asyncio.create_task(batcher.submit(_request(1)))
    await asyncio.sleep(0)  # the call is created, not yet started
    await asyncio.sleep(0)
    for call in list(batcher._calls):
        call.cancel()
    outcome = await asyncio.gather(first, return_exceptions=True)
    assert isinstance(outcome[0], DatabaseUnavailable)
    assert (await batcher.submit(_request(2))).amount == 2
    await asyncio.wait_for(batcher.close(), timeout=2)


async def test_close_sends_what_waits_behind_a_busy_payer() -> None:
    runner = Recorder(delay=0.02)
    batcher = DebitBatcher(runner, runner, lanes=2)
    tasks = [asyncio.create_task(batcher.submit(_request(n))) for n in range(1, 4)]
    await asyncio.sleep(0.005)  # 1 is in flight; 2 and 3 wait behind TENANT
    tasks.append(asyncio.create_task(batcher.submit(_request(4))))
    await asyncio.sleep(0)
    await asyncio.wait_for(batcher.close(), timeout=2)
    assert [t.result().amount for t in tasks] == [1, 2, 3, 4]


async def test_spread_shares_what_waits_among_the_free_lanes_keeping_a_key_together() -> None:
    """`spread`: 16 waiting requests of 12 keys over 4 free lanes go as 4 calls side by side
    (about 4 each), and a key's requests are never split between calls."""
    in_flight = 0
    most = 0
    calls: list[list[tuple[int, int]]] = []

    async def runner(requests: Sequence[tuple[int, int]]) -> list[int]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        calls.append(list(requests))
        await asyncio.sleep(0.01)
        in_flight -= 1
        return [n for _, n in requests]

    commit: GroupCommit[tuple[int, int], int] = GroupCommit(
        runner, runner, lambda request: request[0], lanes=4, spread=True
    )
    requests = [(n % 12, n) for n in range(16)]  # keys 0-3 twice
    answers = await asyncio.gather(*(commit.submit(r) for r in requests))
    assert answers == list(range(16))
    assert most == 4 and len(calls) == 4
    for key in range(12):
        assert len({i for i, call in enumerate(calls) for k, _ in call if k == key}) == 1
    await commit.close()


@pytest.mark.parametrize(
    ("waiting", "spread_min", "sizes"),
    [(8, None, [4, 4]), (17, None, [9, 8]), (16, 16, [16]), (20, 16, [20]), (32, 16, [16, 16])],
)
async def test_debits_waiting_for_two_free_lanes_spread_over_both(
    waiting: int, spread_min: int | None, sizes: list[int]
) -> None:
    """By default debits spread: 16 debits of 16 payers waiting for two free lanes go as two
    calls of 8 at once (the database works on both, one per core), not one call of 16 with a
    lane idle. `spread_min` sets the smallest part: with 16, 16 or 20 go as one call."""
    in_flight = 0
    most = 0
    seen: list[int] = []

    async def runner(requests: Sequence[DebitRequest]) -> list[DebitResult]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        seen.append(len(requests))
        await asyncio.sleep(0.01)
        in_flight -= 1
        return [_ok(r) for r in requests]

    batcher = (
        DebitBatcher(runner, runner, lanes=2)
        if spread_min is None
        else DebitBatcher(runner, runner, lanes=2, spread_min=spread_min)
    )
    debits = [
        DebitRequest(amount=n, turn_id=f"t{n}", tenant_id=uuid.UUID(int=100 + n))
        for n in range(1, waiting + 1)
    ]
    results = await asyncio.gather(*(batcher.submit(d) for d in debits))
    assert [r.amount for r in results] == list(range(1, waiting + 1))
    assert seen == sizes and most == len(sizes)
    await batcher.close()
