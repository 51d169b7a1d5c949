"""Pooled debits: 64 members of one organisation spending from its pool at once.

Run: python bench/org_debits.py [--seconds 8]

On a throwaway embedded PostgreSQL (durable settings; or DATABASE_URL): one organisation
with 64 members (half of them with a credit limit, so the limit check and the usage count
run), each member one task debiting 1 credit per call through the library's group commit;
then the same members one debit per transaction, and a plain (member-less) hot tenant for
comparison. Conservation is checked at the end.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Awaitable, Callable

import psycopg

from loadgen import load, on_a_database
from tollhouse.app import Tollhouse
from tollhouse.credits import CreditService, DebitRequest, conservation_problems
from tollhouse.db import migrate

MEMBERS = 64


async def run(dsn: str, service_dsn: str, seconds: float) -> None:
    await migrate.migrate(dsn)
    async with Tollhouse.open(service_dsn, min_size=8, max_size=70) as th:
        owner = (await th.users.create(email="owner@bench.example")).id
        org = await th.orgs.create("Bench", f"bench-{uuid.uuid4().hex[:8]}", owner)
        members = [owner]
        for i in range(MEMBERS - 1):
            member = (await th.users.create(email=f"m{i}@bench.example")).id
            limit = 10**12 if i % 2 else -1
            await th.orgs.add_member(org.id, member, credit_limit=limit)
            members.append(member)
        await th.credits.grant(amount=10**13, source="purchase", tenant_id=org.id)
        await th.db.transaction(
            lambda conn: conn.execute(
                "UPDATE tollhouse.credit_accounts SET daily_cap = NULL WHERE tenant_id = %s",
                (org.id,),
            )
        )
        credits = CreditService(th.db)

        def pooled(alone: bool, named: bool) -> Callable[[int], Awaitable[object]]:
            send = credits.debit_alone if alone else credits.debit

            async def call(task: int) -> object:
                result = await send(
                    DebitRequest(
                        amount=1,
                        turn_id=uuid.uuid4().hex,
                        tenant_id=org.id,
                        user_id=members[task % MEMBERS] if named else None,
                    )
                )
                assert result.status == "applied", result
                return result

            return call

        print(f"{seconds:.0f} s per case, fsync on, synchronous_commit on")
        print(f"{'case':64} {'ops/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
        for label, call in (
            ("64 members, one pool, group commit", pooled(False, True)),
            ("64 members, one pool, one debit per transaction", pooled(True, True)),
            ("64 tasks, one pool, no member named, group commit", pooled(False, False)),
        ):
            stats = await load(call, seconds, MEMBERS)
            print(f"{label:64} {stats.rate:9.0f} {stats.p50:7.2f} {stats.p99:7.2f}")
        await credits.close()
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        problems = await conservation_problems(aconn)
    print("conservation after the run:", "ok" if not problems else problems[:3])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    on_a_database(lambda dsn, service: run(dsn, service, args.seconds))


if __name__ == "__main__":
    main()
