"""What every benchmark here shares: a closed-loop load generator, a free port, a running
`tollhouse serve`, and a throwaway database to run on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx


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


async def post(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> tuple[int, bytes]:
    """One JSON POST on a kept-alive HTTP/1.1 connection over a raw socket (httpx tops out
    near 500 requests a second on these cores and would measure the client, not the
    service): the status and the body of the answer."""
    head_lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: bench\r\n{head_lines}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


class Served(NamedTuple):
    port: int
    pid: int  # the service's process, for its CPU time (`cpu_seconds`)


@asynccontextmanager
async def serving(dsn: str, service_dsn: str, **settings: str) -> AsyncIterator[int]:
    """`tollhouse serve` on a free port over the database (quiet logs, a pool of 24, plus
    `settings` as environment variables), once `/readyz` answers 200; its port. Stopped on
    exit."""
    async with serving_process(dsn, service_dsn, settings) as served:
        yield served.port


@asynccontextmanager
async def serving_process(
    dsn: str, service_dsn: str, settings: Mapping[str, str], source: Path | None = None
) -> AsyncIterator[Served]:
    """`serving` (`settings` as environment variables), yielding the port and the process
    id; with `source` (a directory holding
    the `tollhouse` package, e.g. another checkout's `src`), that code is served instead
    of the installed one (the same dependencies), for A/B runs on one database."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "TOLLHOUSE_SERVICE_DATABASE_URL": service_dsn,
        "TOLLHOUSE_LOG_LEVEL": "warning",
        "TOLLHOUSE_POOL_MAX_SIZE": "24",
        **settings,
    }
    command = [str(Path(sys.executable).with_name("tollhouse"))]
    if source is not None:
        env["PYTHONPATH"] = str(source)
        command = [sys.executable, "-c", "from tollhouse.cli import main; main()"]
    server = subprocess.Popen(
        [*command, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(300):
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        yield Served(port, server.pid)
    finally:
        server.terminate()
        server.wait(30)


def cpu_seconds(pid: int) -> float:
    """CPU time a running process has used so far (Linux: /proc/<pid>/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as stat:
        return int(stat.read().split()[0]) / 1e9


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process, of its children that ended (its `cutime`/`cstime`) and of
    those still running: for a PostgreSQL postmaster, the whole server's CPU so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    total = cpu_seconds(pid) + (int(fields[13]) + int(fields[14])) / ticks
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        for child in children.read().split():
            # One that ended meanwhile is in cutime (next time).
            with contextlib.suppress(FileNotFoundError):
                total += cpu_seconds(int(child))
    return total


def on_a_database(run: Callable[[str, str], Coroutine[Any, Any, None]]) -> None:
    """Run `run(admin_dsn, service_dsn)` on DATABASE_URL (and TOLLHOUSE_SERVICE_DATABASE_URL)
    when set, else on a throwaway embedded PostgreSQL with durable settings."""
    from tollhouse.db.dsn import as_user
    from tollhouse.db.embedded import EmbeddedPostgres

    external = os.environ.get("DATABASE_URL")
    if external:
        service = os.environ.get("TOLLHOUSE_SERVICE_DATABASE_URL", external)
        asyncio.run(run(external, service))
        return
    scratch = Path(tempfile.mkdtemp(prefix="tollhouse-bench-"))
    server = EmbeddedPostgres(scratch / "pgdata")
    dsn = server.start()
    try:
        asyncio.run(run(dsn, as_user(dsn, "tollhouse_service")))
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)  # a run leaves up to a gigabyte of WAL
