"""Stripe webhooks end to end: signed deliveries over HTTP into `tollhouse serve`, each
stored and applied (subscription upserts, plan changes, invoice allowances) before the 2xx,
against @supabase/stripe-sync-engine on the same PostgreSQL with the same events.

Run: python bench/webhooks.py [--seconds 5 | --events N] [--rounds 2] [--clients 16,64]
     [--customers 2000] [--sse-dir DIR] [--baseline-src DIR] [--variant LABEL:NAME=VALUE]

On one throwaway embedded PostgreSQL (durable settings; or DATABASE_URL): customers linked
to tenants, prices mapped to plans. One sequence of events (per 10: 6 subscription updates,
each moving its customer to the other plan and its credits with it; 2 paid invoices, each
granting an allowance; 1 customer update; 1 unknown type) is sent by every case under the
case's own ids and later Stripe times, so every case does the same work. For each round and
each concurrency, back to back:

- `http`: keep-alive HTTP clients into `tollhouse serve` (and `http base`: the same into a
  second server running the `tollhouse` package found in `--baseline-src`; `http LABEL`:
  one more server of this code with other settings, for A/B runs);
- `in-process`: our `BillingService.receive` called by as many tasks, no HTTP;
- `stripe-sync-engine`: its `processWebhook` (bench/stripe_sync_engine.cjs, `require`d from
  `--sse-dir DIR`, where `npm install @supabase/stripe-sync-engine@0.48.5` ran), in-process
  in node, as many at once (the issue's comparison);
- `sse http`: the same call behind node's own HTTP server, reached by the same load
  generator as `http` (how it would be deployed; the signing moves to the load generator).

Before the rounds every server gets each customer's first event (a warm-up), so that no
measured case pays for creating the customers' credit accounts.

Each case reports events/s, acknowledgement p50/p99 (the acknowledgement includes the
processing: one transaction, docs/billing.md), its rate over stripe-sync-engine's in the same
round (and over `sse http`'s), the CPU time an event of the service process, of PostgreSQL
(the embedded server's whole process tree) and of the HTTP load generator, and the
deliveries per group-commit call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import stripe
from psycopg.conninfo import conninfo_to_dict

from loadgen import (
    Served,
    cpu_seconds,
    free_port,
    post,
    serving_process,
    summarize,
    tree_cpu_seconds,
)
from tollhouse.app import Tollhouse
from tollhouse.billing import BillingConfig
from tollhouse.db import migrate
from tollhouse.db.dsn import as_user
from tollhouse.db.embedded import EmbeddedPostgres

SECRET = "whsec_bench"
#: Group-commit lanes of the in-process runs (BENCH_LANES; else the service's default).
LANES = int(os.environ.get("BENCH_LANES", BillingConfig().lanes))
SETUP = """
INSERT INTO tollhouse.tenants (id, name, owner_user_id, is_default)
SELECT ('00000000-0000-7000-8000-' || lpad(n::text, 12, '0'))::uuid, 'bench ' || n,
       gen_random_uuid(), true
FROM generate_series(1, %(customers)s) n;
INSERT INTO tollhouse.billing_customer_routes (customer_id, tenant_id)
SELECT 'cus_bench_' || n, ('00000000-0000-7000-8000-' || lpad(n::text, 12, '0'))::uuid
FROM generate_series(1, %(customers)s) n;
INSERT INTO tollhouse.billing_customers (tenant_id, customer_id)
SELECT tenant_id, customer_id FROM tollhouse.billing_customer_routes;
INSERT INTO tollhouse.billing_prices (id, plan, type, stripe_at) VALUES
    ('price_bench_starter', 'starter', 'recurring', now()),
    ('price_bench_pro', 'pro', 'recurring', now())
"""


def price(plan: str) -> dict[str, Any]:
    return {
        "id": f"price_bench_{plan}",
        "object": "price",
        "type": "recurring",
        "unit_amount": 2000,
        "metadata": {"tollhouse_plan": plan},
    }


def make_event(n: int, customers: int, case: int, count: int, now: int) -> dict[str, Any]:
    """The n-th event of the sequence, as case `case` sends it: its own ids, Stripe times
    after every earlier case's (so each event applies), and the plans of the previous case
    swapped (so each subscription update moves the credits)."""
    c = n % customers + 1
    customer = f"cus_bench_{c}"
    kind = n % 10
    if kind < 6:
        plan = "pro" if (n // customers + case) % 2 == 0 else "starter"
        obj: dict[str, Any] = {
            "id": f"sub_bench_{c}",
            "object": "subscription",
            "customer": customer,
            "status": "active",
            "cancel_at_period_end": False,
            "items": {
                "object": "list",
                "has_more": False,
                "data": [
                    {
                        "id": f"si_bench_{c}",
                        "object": "subscription_item",
                        "price": price(plan),
                        "current_period_start": now - 60,
                        "current_period_end": now + 30 * 86400,
                    }
                ],
            },
        }
        type_ = "customer.subscription.updated"
    elif kind < 8:
        obj = {
            "id": f"in_bench_{case}_{n}",
            "object": "invoice",
            "customer": customer,
            "status": "paid",
            "amount_paid": 2000,
            "parent": {"subscription_details": {"subscription": f"sub_bench_{c}"}},
            "lines": {
                "data": [
                    {
                        "type": "subscription",
                        "price": price("pro"),
                        "period": {"start": now - 60 + n, "end": now + 30 * 86400 + n},
                    }
                ]
            },
        }
        type_ = "invoice.paid"
    elif kind == 8:
        obj = {"id": customer, "object": "customer", "email": f"{c}@example.com", "metadata": {}}
        type_ = "customer.updated"
    else:
        obj = {"id": f"x_{n}", "object": "thing"}
        type_ = "bench.unknown"
    return {
        "id": f"evt_bench_{case}_{n}",
        "object": "event",
        "type": type_,
        "created": 1_700_000_000 + case * count + n,
        "data": {"object": obj},
    }


@dataclass
class Events:
    """The one sequence every case sends (`make_event`), case after case."""

    count: int
    customers: int
    now: int = field(default_factory=lambda: int(time.time()))
    cases: int = 0

    def next_case(self, count: int | None = None) -> list[bytes]:
        self.cases += 1
        return [
            json.dumps(make_event(n, self.customers, self.cases, self.count, self.now)).encode()
            for n in range(count or self.count)
        ]


class Meter:
    """CPU seconds spent during a case: by PostgreSQL (the whole server, when it is the
    embedded one), by this process (the load generator, or the in-process service) and by
    the serving process, if any."""

    def __init__(self, postmaster: int | None, server: int | None = None) -> None:
        self.postmaster = postmaster
        self.server = server
        self.used: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        now = {"here": time.process_time()}
        if self.postmaster is not None:
            now["pg"] = tree_cpu_seconds(self.postmaster)
        if self.server is not None:
            now["server"] = cpu_seconds(self.server)
        return now

    def __enter__(self) -> Meter:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        self.used = {key: end[key] - self._start[key] for key in end}


@dataclass
class Row:
    case: str  # "http", "http main", "in-process", "stripe-sync-engine"
    clients: int
    round: int
    rate: float
    p50: float
    p99: float
    outcomes: dict[str, float]
    events: int
    #: CPU microseconds an event: the service (serving process, our in-process run, or
    #: node), PostgreSQL, and the HTTP load generator.
    service_us: float | None = None
    pg_us: float | None = None
    client_us: float | None = None


async def deliver(
    port: int, bodies: list[bytes], clients: int
) -> tuple[float, float, float, dict[str, float]]:
    """Keep-alive HTTP/1.1 clients on raw sockets (`loadgen.post`)."""
    latencies: list[float] = []
    statuses: dict[str, float] = {}
    queue = list(reversed(bodies))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            body = queue.pop()
            header = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET)
            started = time.perf_counter()
            status, raw = await post(
                reader, writer, "/v1/stripe/webhook", body, {"Stripe-Signature": header}
            )
            answer = json.loads(raw)
            latencies.append(time.perf_counter() - started)
            assert status == 200, answer
            statuses[answer["status"]] = statuses.get(answer["status"], 0) + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    stats = summarize(latencies, time.perf_counter() - started)
    return stats.rate, stats.p50, stats.p99, statuses


async def batch_counts(port: int) -> tuple[float, float] | None:
    """The server's webhook batches and the deliveries in them so far (None: a server
    without those metrics)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        text = (await http.get("/metrics")).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("tollhouse_stripe_webhook_batch")
    }
    if "tollhouse_stripe_webhook_batches_total" not in values:
        return None
    return (
        values["tollhouse_stripe_webhook_batches_total"],
        values["tollhouse_stripe_webhook_batched_total"],
    )


async def over_http(
    label: str, served: Served, bodies: list[bytes], clients: int, round_: int, pg: int | None
) -> Row:
    before = await batch_counts(served.port)
    with Meter(pg, served.pid) as meter:
        rate, p50, p99, statuses = await deliver(served.port, bodies, clients)
    after = await batch_counts(served.port)
    if before and after and after[0] > before[0]:
        statuses["per batch"] = round((after[1] - before[1]) / (after[0] - before[0]), 1)
    return Row(
        label,
        clients,
        round_,
        rate,
        p50,
        p99,
        statuses,
        len(bodies),
        service_us=meter.used["server"] / len(bodies) * 1e6,
        pg_us=meter.used["pg"] / len(bodies) * 1e6 if "pg" in meter.used else None,
        client_us=meter.used["here"] / len(bodies) * 1e6,
    )


async def in_process(
    service_dsn: str, bodies: list[bytes], clients: int, round_: int, pg: int | None
) -> Row:
    """Our receive() without HTTP, as stripe-sync-engine is measured (signing included)."""
    latencies: list[float] = []
    statuses: dict[str, float] = {}
    queue = list(reversed(bodies))
    config = BillingConfig(
        webhook_secrets=(SECRET,), lanes=LANES, spread=os.environ.get("BENCH_SPREAD", "1") == "1"
    )
    async with Tollhouse.open(service_dsn, min_size=4, max_size=24, billing=config) as th:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                header = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET)
                started = time.perf_counter()
                delivery = await th.billing.receive(body, header)
                latencies.append(time.perf_counter() - started)
                statuses[delivery.status] = statuses.get(delivery.status, 0) + 1

        with Meter(pg) as meter:
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            stats = summarize(latencies, time.perf_counter() - started)
        receiver = th.billing.receiver
        statuses["per batch"] = round(receiver.requests / max(receiver.batches, 1), 1)
    return Row(
        "in-process",
        clients,
        round_,
        stats.rate,
        stats.p50,
        stats.p99,
        statuses,
        len(bodies),
        service_us=meter.used["here"] / len(bodies) * 1e6,
        pg_us=meter.used["pg"] / len(bodies) * 1e6 if "pg" in meter.used else None,
    )


SSE_SCRIPT = Path(__file__).with_name("stripe_sync_engine.cjs")


def sse_environment(sse_dir: str, dsn: str, **extra: str) -> dict[str, str]:
    """The environment of bench/stripe_sync_engine.cjs over database `dsn`."""
    # node-postgres reads no key=value DSNs: pass the embedded server's socket as PG* variables.
    params = conninfo_to_dict(dsn)
    pg_env = {
        f"PG{key.upper()}": str(value)
        for key, value in params.items()
        if key in ("host", "port", "user", "password", "dbname") and value
    }
    if "PGDBNAME" in pg_env:
        pg_env["PGDATABASE"] = pg_env.pop("PGDBNAME")
    return {
        **os.environ,
        **pg_env,
        "SSE_DIR": sse_dir,
        "DATABASE_URL": "" if "://" not in dsn else dsn,
        "WEBHOOK_SECRET": SECRET,
        "POOL": "24",
        **extra,
    }


def stripe_sync_engine(
    sse_dir: str, dsn: str, bodies: list[bytes], clients: int, round_: int, pg: int | None
) -> Row:
    """stripe-sync-engine's `processWebhook` in a node process (bench/stripe_sync_engine.cjs),
    signing included; PostgreSQL's CPU is counted over the whole process (its start-up and
    migrations check too, a little more than the timed part)."""
    events = Path(tempfile.mkdtemp()) / "events.jsonl"
    events.write_bytes(b"\n".join(bodies) + b"\n")
    env = sse_environment(sse_dir, dsn, EVENTS_FILE=str(events), CONCURRENCY=str(clients))
    with Meter(pg) as meter:
        out = subprocess.run(
            ["node", str(SSE_SCRIPT)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    outcomes: dict[str, float] = {"ok": int(result["ok"])}
    outcomes.update({k: int(v) for k, v in result["errors"].items()})
    return Row(
        "stripe-sync-engine",
        clients,
        round_,
        float(result["rate"]),
        float(result["p50"]),
        float(result["p99"]),
        outcomes,
        len(bodies),
        service_us=float(result["cpu_s"]) / len(bodies) * 1e6,
        pg_us=meter.used["pg"] / len(bodies) * 1e6 if "pg" in meter.used else None,
    )


@contextlib.asynccontextmanager
async def serving_sse(sse_dir: str, dsn: str) -> AsyncIterator[Served]:
    """stripe-sync-engine's `processWebhook` behind node's own HTTP server, on a free port
    (bench/stripe_sync_engine.cjs with PORT): the same load generator reaches it as it
    reaches `tollhouse serve`. Stopped on exit."""
    port = free_port()
    node = subprocess.Popen(
        ["node", str(SSE_SCRIPT)],
        env=sse_environment(sse_dir, dsn, PORT=str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert node.stdout is not None
        line = await asyncio.to_thread(node.stdout.readline)
        if json.loads(line or b"{}").get("port") != port:
            raise RuntimeError("stripe-sync-engine's HTTP server did not start")
        yield Served(port, node.pid)
    finally:
        node.terminate()
        node.wait(timeout=30)


def postmaster_pid(pgdata: Path | None) -> int | None:
    """The embedded server's postmaster, whose process tree is PostgreSQL's CPU."""
    if pgdata is None:
        return None
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(rows: list[Row]) -> None:
    print(
        f"{'case':30} {'events/s':>8} {'x sse':>6} {'x http':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'svc us':>7} {'pg us':>6} {'gen us':>6}  outcomes"
    )

    def ratio(row: Row, case: str) -> str:
        rate = next(
            (
                r.rate
                for r in rows
                if r.case == case and (r.round, r.clients) == (row.round, row.clients)
            ),
            None,
        )
        return f"{row.rate / rate:.2f}" if rate else "-"

    for row in rows:
        label = f"r{row.round} {row.clients:>2} {row.case}"
        print(
            f"{label:30} {row.rate:8.0f} {ratio(row, 'stripe-sync-engine'):>6}"
            f" {ratio(row, 'sse http'):>6} {row.p50:7.1f} {row.p99:7.1f}"
            f" {fmt(row.service_us):>7} {fmt(row.pg_us):>6} {fmt(row.client_us):>6}  {row.outcomes}"
        )


async def run(
    dsn: str,
    service_dsn: str,
    args: argparse.Namespace,
    pgdata: Path | None = None,
) -> None:
    await migrate.migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in filter(str.strip, SETUP.split(";")):
            conn.execute(statement, {"customers": args.customers})
    pg = postmaster_pid(pgdata)
    events = Events(args.events or int(args.seconds * 500), args.customers)
    settings = {"TOLLHOUSE_STRIPE_WEBHOOK_SECRET": SECRET, "TOLLHOUSE_BOOTSTRAP_API_KEY": "false"}
    rows: list[Row] = []
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[str, Served] = {
            "http": await stack.enter_async_context(serving_process(dsn, service_dsn, settings))
        }
        if args.baseline_src:
            servers["http base"] = await stack.enter_async_context(
                serving_process(dsn, service_dsn, settings, Path(args.baseline_src))
            )
        for variant in args.variant:
            label, _, assignments = variant.partition(":")
            extra = dict(item.split("=", 1) for item in assignments.split(",") if item)
            servers[f"http {label}"] = await stack.enter_async_context(
                serving_process(dsn, service_dsn, {**settings, **extra})
            )
        if args.sse_dir:
            # stripe-sync-engine behind HTTP: measured like `http`, answered like in-process.
            servers["sse http"] = await stack.enter_async_context(serving_sse(args.sse_dir, dsn))
        # Warm-up: every customer once, so that no measured case pays for creating the
        # credit accounts (a customer's first event does) and every server has its pools.
        for served in servers.values():
            await deliver(served.port, events.next_case(args.customers), 8)
        for round_ in range(1, args.rounds + 1):
            for clients in args.clients:
                # Alternate the servers' order from round to round against drift.
                names = list(servers) if round_ % 2 else list(reversed(servers))
                for name in names:
                    rows.append(
                        await over_http(
                            name, servers[name], events.next_case(), clients, round_, pg
                        )
                    )
                rows.append(await in_process(service_dsn, events.next_case(), clients, round_, pg))
                if args.sse_dir:
                    rows.append(
                        stripe_sync_engine(
                            args.sse_dir, dsn, events.next_case(), clients, round_, pg
                        )
                    )
                report(rows[-(len(names) + 1 + bool(args.sse_dir)) :])

    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        by_status: dict[str, float] = dict(
            conn.execute(
                "SELECT status, count(*) FROM tollhouse.billing_events GROUP BY status"
            ).fetchall()
        )
        grants = conn.execute(
            "SELECT count(*) FROM tollhouse.credit_grants WHERE source_id LIKE 'stripe:invoice:%'"
        ).fetchone()
    print()
    print(
        f"PostgreSQL {version[0] if version else '?'}, {os.cpu_count()} cores, fsync on,"
        f" synchronous_commit on, {args.customers} customers, {events.count} events a case;"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    print("x sse: events/s over stripe-sync-engine's (in-process) in the same round at the same")
    print("concurrency; x http: over stripe-sync-engine behind node's HTTP server (`sse http`);")
    print("svc/pg/gen us: CPU microseconds an event of the service process (HTTP: `tollhouse")
    print(
        "serve`; in-process: this process; sse and sse http: node), of PostgreSQL, of the HTTP load"
    )
    print("generator")
    report(rows)
    print(f"stored events by status: {by_status}; invoice allowances granted: {grants}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="about how long a case runs (500 events/s)"
    )
    parser.add_argument("--events", type=int, default=0, help="events a case (overrides --seconds)")
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--clients",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[16, 64],
        help="concurrencies, comma-separated (default 16,64)",
    )
    parser.add_argument(
        "--sse-dir",
        default=os.environ.get("SSE_DIR"),
        help="where @supabase/stripe-sync-engine@0.48.5 is npm-installed, to compare with it",
    )
    parser.add_argument(
        "--baseline-src",
        help="a directory holding another version of the `tollhouse` package (e.g. `git archive"
        " main src | tar -x -C DIR`, then DIR/src): served too, case by case (`http base`)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
        help="one more server of this code with these settings, case by case (`http LABEL`),"
        " e.g. lanes2:TOLLHOUSE_STRIPE_WEBHOOK_LANES=2",
    )
    args = parser.parse_args()
    external = os.environ.get("DATABASE_URL")
    if external:
        service = os.environ.get("TOLLHOUSE_SERVICE_DATABASE_URL", external)
        asyncio.run(run(external, service, args))
        return
    pgdata = Path(tempfile.mkdtemp(prefix="tollhouse-bench-")) / "pgdata"
    server = EmbeddedPostgres(pgdata)
    dsn = server.start()
    try:
        service = as_user(dsn, "tollhouse_service")
        asyncio.run(run(dsn, service, args, pgdata))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
