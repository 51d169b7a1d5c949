"""Credits throughput on this machine, every figure issue 4 asks for, in one run.

Run: python bench/credits.py [--seconds 8]

On one throwaway embedded PostgreSQL (durable settings; or DATABASE_URL):
- pgbench calling credit_debit_v1 directly, 16 clients, 10,000 tenants: the ceiling of one
  debit per transaction on this machine;
- the library with group commit at 16 and 64 tasks on 10,000 tenants, and one debit per
  transaction for comparison;
- one hot tenant at 64 tasks, coalesced and one debit per transaction;
- a naive baseline (SELECT ... FOR UPDATE, UPDATE, INSERT: three round trips);
- HTTP through `tollhouse serve` at 16 and 64 concurrent clients;
- balance reads.
Then the conservation check. Each figure as ops/s, p50/p99 ms, and the ratio to pgbench.
The server's WAL is warmed first (see WARM_WAL; --cold-wal skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg

from loadgen import load, on_a_database, post, serving, summarize
from tollhouse.app import Tollhouse
from tollhouse.credits import CreditService, DebitRequest, conservation_problems
from tollhouse.db import migrate
from tollhouse.db.schema import pg_dump_path

TENANTS = 10_000
HOT = uuid.UUID("00000000-0000-7000-8000-999999999999")
SETUP = """
INSERT INTO tollhouse.tenants (id, name, slug, owner_user_id)
SELECT ('00000000-0000-7000-8000-' || lpad(n::text, 12, '0'))::uuid, 'bench ' || n,
       'bench-' || n, gen_random_uuid()
FROM generate_series(1, %(tenants)s) n
UNION ALL SELECT %(hot)s, 'hot', 'hot', gen_random_uuid();
UPDATE tollhouse.plans SET monthly_credits = 0, daily_cap = NULL;
SELECT count(*) FROM tollhouse.tenants t,
     LATERAL tollhouse.credit_grant_v1(t.id, NULL, 1000000000, 'purchase', 'bench', 0, NULL);
CREATE TABLE public.naive_accounts (id uuid PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE public.naive_ledger (id uuid PRIMARY KEY, account uuid, delta bigint,
                                  turn_id text UNIQUE);
INSERT INTO public.naive_accounts
SELECT ('00000000-0000-7000-8000-' || lpad(n::text, 12, '0'))::uuid, 1000000000
FROM generate_series(1, %(tenants)s) n;
GRANT SELECT, INSERT, UPDATE ON public.naive_accounts, public.naive_ledger TO tollhouse_service;
"""
PGBENCH_SCRIPT = (
    "\\set n random(1, 10000)\n"
    "SELECT tollhouse.credit_debit_v1("
    "('00000000-0000-7000-8000-' || lpad(:n::text, 12, '0'))::uuid, NULL, 1,"
    " md5(random()::text || clock_timestamp()::text), NULL, 'llm_usage', '{}'::jsonb);\n"
)


# A server that has been running reuses its WAL segment files (each checkpoint renames the
# old ones for reuse); a fresh data directory creates each new 16 MB segment, zero-filled
# and flushed (about 10 ms here), every 1-2 s at these rates, and every commit waits for it.
# The warm-up writes this much WAL and checkpoints, so the run measures the steady state.
WARM_WAL = """
CREATE TABLE public.wal_warmup (n int, pad text);
INSERT INTO public.wal_warmup SELECT n, repeat('w', 1000) FROM generate_series(1, 700000) n;
DROP TABLE public.wal_warmup;
CHECKPOINT
"""


def tenant(n: int) -> uuid.UUID:
    return uuid.UUID(f"00000000-0000-7000-8000-{n:012d}")


def pgbench(dsn: str, seconds: float, clients: int) -> float:
    script = Path(tempfile.mkdtemp()) / "debit.sql"
    script.write_text(PGBENCH_SCRIPT)
    binary = str(Path(pg_dump_path()).with_name("pgbench"))
    out = subprocess.run(
        [
            binary,
            "-n",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(int(seconds)),
            "-f",
            str(script),
            dsn,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    assert match, out
    return float(match[1])


async def http_load(
    port: int, key: str, seconds: float, clients: int
) -> tuple[float, float, float]:
    """Keep-alive HTTP/1.1 clients on raw sockets (`loadgen.post`)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            body = (
                f'{{"tenant_id": "{tenant(random.randint(1, TENANTS))}", "amount": 1,'
                f' "turn_id": "{uuid.uuid4().hex}"}}'
            ).encode()
            started = time.perf_counter()
            status, answer = await post(
                reader, writer, "/v1/credits/debit", body, {"Authorization": f"Bearer {key}"}
            )
            assert status == 200, answer
            latencies.append(time.perf_counter() - started)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    stats = summarize(latencies, time.perf_counter() - started)
    return stats.rate, stats.p50, stats.p99


async def run(
    dsn: str,
    service_dsn: str,
    seconds: float,
    lanes: int = 2,
    spreading: bool = True,
    warm_wal: bool = True,
) -> None:
    await migrate.migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in filter(str.strip, SETUP.split(";")):
            params = {"tenants": TENANTS, "hot": HOT} if "%(" in statement else None
            conn.execute(statement, params)
        for statement in filter(str.strip, WARM_WAL.split(";") if warm_wal else []):
            conn.execute(statement)
    rows: list[tuple[str, float, float | None, float | None]] = []
    ceiling = pgbench(dsn, seconds, 16)
    rows.append(("pgbench, credit_debit_v1, 16 clients, 10k tenants", ceiling, None, None))

    async with Tollhouse.open(service_dsn, min_size=8, max_size=70) as th:
        credits = CreditService(th.db, lanes=lanes, spread=spreading)

        def spread(alone: bool) -> Callable[[int], Awaitable[object]]:
            send = credits.debit_alone if alone else credits.debit

            async def call(_: int) -> object:
                return await send(
                    DebitRequest(
                        amount=1,
                        turn_id=uuid.uuid4().hex,
                        tenant_id=tenant(random.randint(1, TENANTS)),
                    )
                )

            return call

        def hot(alone: bool) -> Callable[[int], Awaitable[object]]:
            send = credits.debit_alone if alone else credits.debit

            async def call(_: int) -> object:
                return await send(DebitRequest(amount=1, turn_id=uuid.uuid4().hex, tenant_id=HOT))

            return call

        for label, call, tasks in (
            ("library, group commit, 16 tasks, 10k tenants", spread(False), 16),
            ("library, group commit, 64 tasks, 10k tenants", spread(False), 64),
            ("library, one debit per transaction, 16 tasks", spread(True), 16),
            ("library, one debit per transaction, 64 tasks", spread(True), 64),
            ("one hot tenant, group commit, 64 tasks", hot(False), 64),
            ("one hot tenant, one debit per transaction, 64 tasks", hot(True), 64),
        ):
            before = (credits.batcher.batches, credits.batcher.requests)
            rate, p50, p99, _ = await load(call, seconds, tasks)
            batches = credits.batcher.batches - before[0]
            debits = credits.batcher.requests - before[1]
            if batches:
                label += f" (avg batch {debits / batches:.1f})"
            rows.append((label, rate, p50, p99))

        async def naive(_: int) -> object:
            account = tenant(random.randint(1, TENANTS))
            async with th.db.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "SELECT balance FROM public.naive_accounts WHERE id = %s FOR UPDATE", (account,)
                )
                (balance,) = await cur.fetchone() or (0,)
                await conn.execute(
                    "UPDATE public.naive_accounts SET balance = %s WHERE id = %s",
                    (balance - 1, account),
                )
                await conn.execute(
                    "INSERT INTO public.naive_ledger VALUES (gen_random_uuid(), %s, -1, %s)",
                    (account, uuid.uuid4().hex),
                )
            return None

        rate, p50, p99, _ = await load(naive, seconds, 16)
        rows.append(("naive: SELECT FOR UPDATE, UPDATE, INSERT, 16 tasks", rate, p50, p99))

        async def read(_: int) -> object:
            return await credits.balance(tenant_id=tenant(random.randint(1, TENANTS)))

        rate, p50, p99, _ = await load(read, seconds, 16)
        rows.append(("balance read, 16 tasks", rate, p50, p99))
        key = (await th.keys.create("bench")).secret
        await credits.close()

    async with serving(dsn, service_dsn) as port:
        for clients in (16, 64):
            rate, p50, p99 = await http_load(port, key, seconds, clients)
            rows.append((f"HTTP POST /v1/credits/debit, {clients} clients", rate, p50, p99))

    with psycopg.connect(dsn) as sync_conn:
        version = sync_conn.execute("SHOW server_version").fetchone()
    print(
        f"PostgreSQL {version[0] if version else '?'}, {os.cpu_count()} cores, "
        f"{seconds:.0f} s per case, fsync on, synchronous_commit on, "
        f"WAL {'warmed' if warm_wal else 'cold (fresh data directory)'}"
    )
    print(f"{'case':74} {'ops/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'x pgbench':>9}")
    for label, ops, median, tail in rows:
        p50s = f"{median:7.2f}" if median is not None else "      -"
        p99s = f"{tail:7.2f}" if tail is not None else "      -"
        print(f"{label:74} {ops:9.0f} {p50s} {p99s} {ops / ceiling:9.2f}")
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        problems = await conservation_problems(aconn)
    print("conservation after the run:", "ok" if not problems else problems[:3])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--lanes", type=int, default=2, help="group-commit lanes")
    parser.add_argument(
        "--no-spread", action="store_true", help="one call takes all that waits (the old way)"
    )
    parser.add_argument(
        "--cold-wal",
        action="store_true",
        help="skip the WAL warm-up: new segment files are created (zero-filled) during the run",
    )
    args = parser.parse_args()
    on_a_database(
        lambda dsn, service: run(
            dsn, service, args.seconds, args.lanes, not args.no_spread, not args.cold_wal
        )
    )


if __name__ == "__main__":
    main()
