"""What every benchmark here shares: a closed-loop load generator and a free port."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple


class Stats(NamedTuple):
    rate: float  # calls per second
    p50: float  # milliseconds
    p99: float  # milliseconds
    calls: int


def summarize(latencies: list[float], elapsed: float) -> Stats:
    """Rate and percentiles of latencies (seconds) measured over `elapsed` seconds."""
    latencies.sort()
    return Stats(
        len(latencies) / elapsed,
        statistics.median(latencies) * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
        len(latencies),
    )


async def load(call: Callable[[int], Awaitable[object]], seconds: float, concurrency: int) -> Stats:
    """`concurrency` tasks call `call(n)` back to back for `seconds` (n counts the calls)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            counter += 1
            started = time.perf_counter()
            await call(counter)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(latencies, time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
