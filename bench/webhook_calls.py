"""PostgreSQL's CPU an event inside `billing_receive_v1`, by the deliveries a call carries.

Run: python bench/webhook_calls.py [--sizes 4,8,16] [--cases 6] [--events 2500]
     [--customers 2000] [--baseline-src DIR]

The function the webhook group commit calls (one call, one transaction, a batch of
deliveries), called directly by one connection as the service role, in calls of each size:
no HTTP, no service process and no load generator, so that a change to the SQL shows
without the noise `bench/webhooks.py` has on a shared machine (there, PostgreSQL is about two
thirds of an event's CPU). The events are `bench/webhooks.py`'s (per 10: 6 subscription
updates, each moving its customer to the other plan; 2 paid invoices; 1 customer update; 1
unknown type), a new case of them for every measurement, after a warm-up that sends each
customer's first event.

Each side runs on a throwaway embedded PostgreSQL of its own (durable settings): `this`, with
this checkout's migrations, and with `--baseline-src DIR` (a directory holding another
version of the `tollhouse` package, e.g. `mkdir -p /tmp/base && git archive <commit> src |
tar -x -C /tmp/base`, then /tmp/base/src) `base`, migrated by that version; each side is
sent its own version's `receive` statement (billing/queries.sql), so a change to either
shows. Both are warmed up, then analysed, before the first
case. The cases go through every side and size in turn, each case in another order (with
`--cases` a multiple of sides x sizes, each takes every place once), so that the host's
changes of speed fall on all of them. A measurement is the backend's CPU time (Linux:
/proc/<pid>/schedstat) over the case's events; the server's other processes (WAL writer,
checkpointer, autovacuum) are not counted. Reported: the mean over the cases, the range, and
with a baseline the ratio and in how many cases this side used less.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import LiteralString

import psycopg

from loadgen import cpu_seconds
from tollhouse.billing.service import Incoming, queries, receive_params
from tollhouse.db import migrate
from tollhouse.db.dsn import as_user
from tollhouse.db.embedded import EmbeddedPostgres
from tollhouse.db.queries import parse_queries
from webhooks import SETUP, Events

#: Run by the baseline's Python path: that version's migrations.
MIGRATE = (
    "import asyncio, sys; from tollhouse.db import migrate;"
    " asyncio.run(migrate.migrate(sys.argv[1]))"
)


@dataclass
class Side:
    name: str
    conn: psycopg.Connection[tuple[object, ...]]
    pid: int
    events: Events
    #: The `receive` statement of the side's version.
    receive: LiteralString
    #: Backend CPU microseconds an event, by call size, one entry a case.
    used: dict[int, list[float]] = field(default_factory=dict)


@contextmanager
def database(scratch: Path, name: str, source: Path | None) -> Iterator[str]:
    """A fresh embedded PostgreSQL migrated by this code, or by the package in `source`."""
    server = EmbeddedPostgres(scratch / name)
    dsn = server.start()
    try:
        if source is None:
            asyncio.run(migrate.migrate(dsn))
        else:
            env = {**os.environ, "PYTHONPATH": str(source)}
            subprocess.run([sys.executable, "-c", MIGRATE, dsn], env=env, check=True)
        yield dsn
    finally:
        server.stop()


def call_params(bodies: list[bytes]) -> dict[str, object]:
    """The `receive` query's parameters for a batch, as `BillingService._receive` makes them
    (the benchmark's customers are all linked: nothing is parked, so `unpark` never asks for
    a second call)."""
    return {**receive_params([Incoming.read(body) for body in bodies]), "unpark": False}


def send(side: Side, bodies: list[bytes], size: int) -> None:
    for start in range(0, len(bodies), size):
        rows = side.conn.execute(
            side.receive,
            call_params(bodies[start : start + size]),
        ).fetchall()
        assert all(row[2] in ("processed", "ignored") for row in rows), rows


def receive_statement(source: Path | None) -> LiteralString:
    """The `receive` statement of this checkout, or of the package in `source`."""
    if source is None:
        return queries["receive"]
    path = source / "tollhouse" / "billing" / "queries.sql"
    return parse_queries(path.read_text("utf-8"), str(path))["receive"]


def prepare(dsn: str, name: str, args: argparse.Namespace, receive: LiteralString) -> Side:
    with psycopg.connect(dsn, autocommit=True) as admin:
        for statement in filter(str.strip, SETUP.split(";")):
            admin.execute(statement, {"customers": args.customers} if "%(" in statement else None)
    conn = psycopg.connect(as_user(dsn, "tollhouse_service"), autocommit=True)
    try:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        side = Side(name, conn, int(str(row[0])), Events(args.events, args.customers), receive)
        send(side, side.events.next_case(args.customers), max(args.sizes))  # the warm-up
    except BaseException:
        conn.close()
        raise
    return side


def analyse(dsn: str) -> None:
    """After both warm-ups, so that no side is measured before or after autoanalyze."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ANALYZE")


def measure(sides: list[Side], sizes: list[int], cases: int) -> None:
    runs = [(side, size) for size in sizes for side in sides]
    for case in range(cases):
        shift = case % len(runs)
        order = runs[shift:] + runs[:shift]
        if (case // len(runs)) % 2:
            order.reverse()
        line = []
        for side, size in order:
            bodies = side.events.next_case()
            before = cpu_seconds(side.pid)
            send(side, bodies, size)
            used = (cpu_seconds(side.pid) - before) / len(bodies) * 1e6
            side.used.setdefault(size, []).append(used)
            line.append(f"{side.name} {size}: {used:.0f}")
        print(f"case {case + 1}: " + ", ".join(line), flush=True)


def report(sides: list[Side], sizes: list[int]) -> None:
    print(
        f"\nbackend CPU us an event, mean (min-max) of {len(sides[0].used[sizes[0]])} cases;"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    for size in sizes:
        cells = []
        for side in sides:
            used = side.used[size]
            cells.append(
                f"{side.name} {statistics.mean(used):5.0f} ({min(used):.0f}-{max(used):.0f})"
            )
        if len(sides) == 2:
            this, base = sides[0].used[size], sides[1].used[size]
            lower = sum(a < b for a, b in zip(this, base, strict=True))
            cells.append(
                f"this/base {statistics.mean(this) / statistics.mean(base):.3f},"
                f" lower in {lower} of {len(this)}"
            )
        print(f"calls of {size:3d}: " + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8,16", help="deliveries a call, comma-separated")
    parser.add_argument("--cases", type=int, default=6, help="measurements of each size")
    parser.add_argument("--events", type=int, default=2500, help="events a case")
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--baseline-src", type=Path, help="another `tollhouse` package's dir")
    args = parser.parse_args()
    args.sizes = [int(size) for size in args.sizes.split(",")]
    if args.cases < 1 or min(args.sizes) < 1:
        parser.error("--cases and every size must be at least 1")
    scratch = Path(tempfile.mkdtemp(prefix="tollhouse-bench-"))
    started = time.perf_counter()
    try:
        with database(scratch, "this", None) as this_dsn:
            sides = [prepare(this_dsn, "this", args, receive_statement(None))]
            try:
                if args.baseline_src is None:
                    analyse(this_dsn)
                    measure(sides, args.sizes, args.cases)
                else:
                    with database(scratch, "base", args.baseline_src.resolve()) as base_dsn:
                        receive = receive_statement(args.baseline_src.resolve())
                        sides.append(prepare(base_dsn, "base", args, receive))
                        try:
                            analyse(this_dsn)
                            analyse(base_dsn)
                            measure(sides, args.sizes, args.cases)
                        finally:
                            sides[1].conn.close()
            finally:
                sides[0].conn.close()
        report(sides, args.sizes)
        print(f"({time.perf_counter() - started:.0f} s)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
