"""Waiting for a lock wait: how the race tests know the other side is blocked."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg


async def a_lock_wait(dsn: str, task: asyncio.Task[Any]) -> bool:
    """Whether a session of this database waits for a lock (a row's too: a transaction id's,
    which names no database), polled for up to 5 s; stops early when `task` ends (it never
    waited)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(500):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE NOT l.granted AND a.datname = current_database()"
            )
            if (await cur.fetchone() or (0,))[0]:
                return True
            if task.done():
                return False
            await asyncio.sleep(0.01)
    return False
