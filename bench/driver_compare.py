"""Compare psycopg 3 and asyncpg on a one-function debit (the foundation's driver decision).

Run: python bench/driver_compare.py [--seconds 5] [--concurrency 16]

Starts a throwaway embedded PostgreSQL (or uses DATABASE_URL), creates a tiny
accounts table and a PL/pgSQL debit function, then has N tasks call it through
each driver's pool for a fixed time. Prints ops/s and p50/p99 latency per driver.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from loadgen import load

SETUP = """
DROP TABLE IF EXISTS bench_accounts;
CREATE TABLE bench_accounts (id int PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
INSERT INTO bench_accounts SELECT g, 1000000000 FROM generate_series(1, 10000) g;
CREATE OR REPLACE FUNCTION bench_debit(p_id int, p_amount bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE v bigint;
BEGIN
  UPDATE bench_accounts SET balance = balance - p_amount WHERE id = p_id RETURNING balance INTO v;
  RETURN v;
END $$;
"""


async def bench_psycopg(
    dsn: str, seconds: float, concurrency: int, autocommit: bool
) -> tuple[float, float, float]:
    from psycopg_pool import AsyncConnectionPool

    # Without autocommit psycopg wraps the call in BEGIN ... COMMIT: two extra round trips.
    async with AsyncConnectionPool(
        dsn,
        min_size=concurrency,
        max_size=concurrency,
        open=False,
        kwargs={"autocommit": autocommit},
    ) as pool:
        await pool.wait()

        async def call(account: int) -> object:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT bench_debit(%s, 1)", (account,))
                return await cur.fetchone()

        stats = await load(lambda _: call(random.randint(1, 10000)), seconds, concurrency)
        return stats.rate, stats.p50, stats.p99


async def bench_asyncpg(
    dsn: str, seconds: float, concurrency: int, reset: bool
) -> tuple[float, float, float]:
    import asyncpg

    kwargs: dict[str, object] = {}
    if not reset:
        kwargs["reset"] = None
    # asyncpg takes only URLs; the embedded server's DSN is in key=value form.
    params = conninfo_to_dict(dsn)
    pool = await asyncpg.create_pool(
        user=params.get("user"),
        database=params.get("dbname"),
        host=params.get("host"),
        port=params.get("port"),
        password=params.get("password"),
        min_size=concurrency,
        max_size=concurrency,
    )
    if not reset:
        # asyncpg runs RESET ALL / UNLISTEN / advisory unlock on every release by default.
        for holder in pool._holders:
            holder._con._reset_query = ""

    async def call(account: int) -> object:
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT bench_debit($1, 1)", account)

    try:
        stats = await load(lambda _: call(random.randint(1, 10000)), seconds, concurrency)
        return stats.rate, stats.p50, stats.p99
    finally:
        await pool.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    dsn = os.environ.get("DATABASE_URL")
    server = None
    if not dsn:
        from tollhouse.db.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="tollhouse-bench-")) / "pg")
        dsn = server.start()
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP)
        version = conn.execute("SHOW server_version").fetchone()
    server_version = version[0] if version else "?"
    print(f"PostgreSQL {server_version}, {args.concurrency} tasks, {args.seconds}s each")
    results = {
        "psycopg 3 (pool, autocommit)": await bench_psycopg(
            dsn, args.seconds, args.concurrency, True
        ),
        "psycopg 3 (pool, BEGIN/COMMIT)": await bench_psycopg(
            dsn, args.seconds, args.concurrency, False
        ),
        "asyncpg (pool, default reset)": await bench_asyncpg(
            dsn, args.seconds, args.concurrency, True
        ),
        "asyncpg (pool, no reset)": await bench_asyncpg(dsn, args.seconds, args.concurrency, False),
    }
    print(f"{'driver':36} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rate, p50, p99) in results.items():
        print(f"{name:36} {rate:9.0f} {p50:8.2f} {p99:8.2f}")
    if server is not None:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
