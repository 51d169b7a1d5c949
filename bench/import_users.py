"""Benchmark: import a generated legacy users.csv of N records (default 1,000,000) into a
fresh embedded PostgreSQL, then import it again (every record unchanged).

    python bench/import_users.py [--records N] [--batch-size N] [--keep FILE]
                                 [--bulk-settings] [--without-foreign-keys]

Prints records/s, seconds per phase and the importer's peak RSS (this process: the file is
generated in a child process first, so the generator's memory is not counted). Issue 7's
target: 1,000,000 records in at most 60 s, peak RSS under 300 MB. `--without-foreign-keys`
drops every foreign key of the schema after migrating: not a way to run, a measure of the
most the foreign-key checks can cost (docs/import.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from tollhouse.app import Tollhouse
from tollhouse.credits import conservation_problems
from tollhouse.db import migrate
from tollhouse.db.dsn import as_user
from tollhouse.db.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
#: A server sized for a bulk load: more cache, fewer checkpoints (full-page writes). fsync and
#: synchronous_commit stay on: every committed batch is durable.
BULK_SETTINGS = {
    "shared_buffers": "2GB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
    "wal_compression": "on",
}


def generate(path: Path, records: int) -> None:
    code = (
        "import sys; from pathlib import Path;"
        f"sys.path.insert(0, {str(ROOT)!r});"
        "from tests.support.legacy_csv import write_legacy_csv;"
        f"write_legacy_csv(Path({str(path)!r}), {records})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_cpu(pid: int, children: bool) -> float:
    """utime + stime of a process (and of its reaped children), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(f) for f in fields[11 : 15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pgdata: Path) -> tuple[float, float]:
    """CPU seconds so far of the server (postmaster, the backends it reaped, the live ones)
    and of this process with its reaped children (the reader process). Linux only: (0, 0)
    elsewhere."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    try:
        postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    except (OSError, ValueError):
        return 0.0, client
    server = _proc_cpu(postmaster, True)
    for pid in pids:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == postmaster:
            server += _proc_cpu(pid, False)
    return server, client


async def drop_foreign_keys(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint c"
            " JOIN pg_namespace n ON n.oid = c.connamespace"
            " WHERE n.nspname = 'tollhouse' AND c.contype = 'f'"
        )
        keys = await cur.fetchall()
        for table, name in keys:
            await conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    sql.SQL(table), sql.Identifier(name)
                )
            )
    return len(keys)


async def run(
    dsn: str, pgdata: Path, path: Path, records: int, batch_size: int, without_fks: bool
) -> None:
    await migrate.migrate(dsn)
    if without_fks:
        print(f"dropped {await drop_foreign_keys(dsn)} foreign keys (a measure, not a setup)")
    service_dsn = as_user(dsn, "tollhouse_service")
    rss_before = peak_rss_mb()
    async with Tollhouse.open(service_dsn, min_size=1, max_size=2) as tollhouse:
        phases: dict[str, float] = {}
        cpu: dict[str, tuple[float, float]] = {}
        since = time.perf_counter()
        cpu_since = cpu_seconds(pgdata)
        current = ""

        def close_phase() -> None:
            nonlocal since, cpu_since
            now, cpu_now = time.perf_counter(), cpu_seconds(pgdata)
            if current:
                phases[current] = now - since
                cpu[current] = (cpu_now[0] - cpu_since[0], cpu_now[1] - cpu_since[1])
            since, cpu_since = now, cpu_now

        def progress(phase: str, done: int, total: int) -> None:
            nonlocal current
            if phase != current:
                close_phase()
                print(f"  {phase} from {time.perf_counter() - start:.1f} s", file=sys.stderr)
                current = phase

        start = time.perf_counter()
        first = await tollhouse.imports.import_users(path, batch_size=batch_size, progress=progress)
        total = time.perf_counter() - start
        close_phase()
        rss = peak_rss_mb()
        start = time.perf_counter()
        second = await tollhouse.imports.import_users(path, batch_size=batch_size)
        again = time.perf_counter() - start
        server_again, client_again = (
            a - b for a, b in zip(cpu_seconds(pgdata), cpu_since, strict=True)
        )
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        problems = await conservation_problems(conn)
        cur = await conn.execute("SELECT count(*) FROM tollhouse.credit_ledger")
        ledger = (await cur.fetchone() or [0])[0]
    print(f"records                 {records:,}")
    print(f"file                    {path.stat().st_size / 1e6:.0f} MB")
    print(
        f"first import            {total:.1f} s  ({records / total:,.0f} records/s)"
        f"  [staging+classify {phases.get('staging', 0):.1f} s,"
        f" apply {phases.get('applying', 0):.1f} s]"
    )
    print(
        f"  created {first.created:,}  failed {first.failed:,}  warnings {first.warnings:,}"
        f"  ledger rows {ledger:,}"
    )
    for phase, (server_cpu, client_cpu) in cpu.items():
        print(
            f"  {phase + ' CPU':<22}server {server_cpu:.1f} s, importer {client_cpu:.1f} s"
            " (with its reader process)"
        )
    print(
        f"second import           {again:.1f} s  unchanged {second.unchanged:,}"
        f"  created {second.created}"
    )
    print(f"  CPU                   server {server_again:.1f} s, importer {client_again:.1f} s")
    print(f"load average            {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"peak RSS                {rss:.0f} MB (before the import: {rss_before:.0f} MB)")
    print(f"conservation            {'ok' if not problems else problems[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="reuse or keep the generated file here")
    parser.add_argument(
        "--bulk-settings",
        action="store_true",
        help="give the server bulk-load settings first (BULK_SETTINGS; durability unchanged)",
    )
    parser.add_argument(
        "--without-foreign-keys",
        action="store_true",
        help="drop every foreign key after migrating, to measure what their checks cost",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tollhouse-bench-import-"))
    path = args.keep or work / "users.csv"
    if not path.exists():
        started = time.perf_counter()
        generate(path, args.records)
        print(f"generated {path} in {time.perf_counter() - started:.1f} s")
    server = EmbeddedPostgres(work / "pgdata")
    try:
        dsn = server.start()
        if args.bulk_settings:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for name, value in BULK_SETTINGS.items():
                    conn.execute(
                        sql.SQL("ALTER SYSTEM SET {} = {}").format(
                            sql.Identifier(name), sql.Literal(value)
                        )
                    )
            server.stop()
            dsn = server.start()
            print(f"server settings: {BULK_SETTINGS}")
        asyncio.run(
            run(
                dsn,
                work / "pgdata",
                path,
                args.records,
                args.batch_size,
                args.without_foreign_keys,
            )
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the database; a --keep file lives elsewhere


if __name__ == "__main__":
    main()
