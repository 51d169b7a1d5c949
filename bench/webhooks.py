"""Stripe webhooks end to end: signed deliveries over HTTP into `tollhouse serve`, each
stored and applied (subscription upserts, plan changes, invoice allowances) before the 2xx.

Run: python bench/webhooks.py [--seconds 8] [--customers 2000] [--sse-dir DIR]

On one throwaway embedded PostgreSQL (durable settings; or DATABASE_URL): customers linked
to tenants, prices mapped to plans; then keep-alive HTTP clients send a mix of events
(per 10: 6 subscription updates alternating starter/pro, so each one changes the plan and the
credits; 2 paid invoices, each granting an allowance; 1 customer update; 1 unknown type),
at 16 and 64 concurrent clients; then the same deliveries again (duplicates). Prints
events/s and acknowledgement p50/p99, and checks that every event was applied.

The acknowledgement includes the processing: it is one transaction (docs/billing.md).

With `--sse-dir DIR` (where `npm install @supabase/stripe-sync-engine@0.48.5` ran), the same
mix of events is also processed in-process by our `BillingService.receive` and by
stripe-sync-engine's `processWebhook` (bench/stripe_sync_engine.cjs, loaded with `require`),
on the same PostgreSQL, at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import stripe
from psycopg.conninfo import conninfo_to_dict

from loadgen import post, serving, summarize
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


def make_event(n: int, customers: int, run: str) -> dict[str, Any]:
    """The n-th event of the mix; its Stripe time grows with n, so each one applies."""
    c = n % customers + 1
    customer = f"cus_bench_{c}"
    now = int(time.time())
    kind = n % 10
    if kind < 6:
        plan = "pro" if (n // customers) % 2 == 0 else "starter"
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
        invoice_id = f"in_bench_{run}_{n}"
        obj = {
            "id": invoice_id,
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
        "id": f"evt_{run}_{n}",
        "object": "event",
        "type": type_,
        "created": 1_700_000_000 + n,
        "data": {"object": obj},
    }


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


async def in_process(
    service_dsn: str, bodies: list[bytes], clients: int
) -> tuple[float, float, float, dict[str, float]]:
    """Our receive() without HTTP, as stripe-sync-engine is measured."""
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

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        stats = summarize(latencies, time.perf_counter() - started)
        receiver = th.billing.receiver
        statuses["per batch"] = round(receiver.requests / max(receiver.batches, 1), 1)
    return stats.rate, stats.p50, stats.p99, statuses


def stripe_sync_engine(
    sse_dir: str, dsn: str, bodies: list[bytes], clients: int
) -> tuple[float, float, float, dict[str, float]]:
    events = Path(tempfile.mkdtemp()) / "events.jsonl"
    events.write_bytes(b"\n".join(bodies) + b"\n")
    # node-postgres reads no key=value DSNs: pass the embedded server's socket as PG* variables.
    params = conninfo_to_dict(dsn)
    pg_env = {
        f"PG{key.upper()}": str(value)
        for key, value in params.items()
        if key in ("host", "port", "user", "password", "dbname") and value
    }
    if "PGDBNAME" in pg_env:
        pg_env["PGDATABASE"] = pg_env.pop("PGDBNAME")
    env = {
        **os.environ,
        **pg_env,
        "SSE_DIR": sse_dir,
        "DATABASE_URL": "" if "://" not in dsn else dsn,
        "WEBHOOK_SECRET": SECRET,
        "EVENTS_FILE": str(events),
        "CONCURRENCY": str(clients),
        "POOL": "24",
    }
    script = Path(__file__).with_name("stripe_sync_engine.cjs")
    out = subprocess.run(
        ["node", str(script)], env=env, capture_output=True, text=True, check=True, timeout=600
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    outcomes: dict[str, float] = {"ok": int(result["ok"])}
    outcomes.update({k: int(v) for k, v in result["errors"].items()})
    return float(result["rate"]), float(result["p50"]), float(result["p99"]), outcomes


async def compare(
    dsn: str, service_dsn: str, sse_dir: str, seconds: float, customers: int
) -> list[tuple[str, float, float, float, dict[str, float]]]:
    rows = []
    count = int(seconds * 300)
    for clients in (16, 64):
        ours = [json.dumps(make_event(n, customers, f"ip{clients}")).encode() for n in range(count)]
        rate, p50, p99, st = await in_process(service_dsn, ours, clients)
        rows.append((f"in-process, ours, {clients} tasks", rate, p50, p99, st))
        theirs = [
            json.dumps(make_event(n, customers, f"se{clients}")).encode() for n in range(count)
        ]
        rate, p50, p99, st = stripe_sync_engine(sse_dir, dsn, theirs, clients)
        rows.append((f"in-process, stripe-sync-engine, {clients} tasks", rate, p50, p99, st))
    return rows


async def run(
    dsn: str, service_dsn: str, seconds: float, customers: int, sse_dir: str | None = None
) -> None:
    await migrate.migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in filter(str.strip, SETUP.split(";")):
            conn.execute(statement, {"customers": customers})
    rows: list[tuple[str, float, float, float, dict[str, float]]] = []
    async with serving(
        dsn,
        service_dsn,
        TOLLHOUSE_STRIPE_WEBHOOK_SECRET=SECRET,
        TOLLHOUSE_BOOTSTRAP_API_KEY="false",
    ) as port:
        warm = [json.dumps(make_event(n, customers, "warm")).encode() for n in range(200)]
        await deliver(port, warm, 8)
        for clients in (16, 64):
            # Enough events for about `seconds` at the expected rate; signed at send time.
            count = int(seconds * 400)
            run_id = f"c{clients}"
            bodies = [json.dumps(make_event(n, customers, run_id)).encode() for n in range(count)]
            rate, p50, p99, statuses = await deliver(port, bodies, clients)
            rows.append((f"new events, {clients} clients", rate, p50, p99, statuses))
            rate, p50, p99, statuses = await deliver(port, bodies[: count // 2], clients)
            rows.append((f"duplicate deliveries, {clients} clients", rate, p50, p99, statuses))
    if sse_dir:
        rows += await compare(dsn, service_dsn, sse_dir, seconds, customers)

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
    print(
        f"PostgreSQL {version[0] if version else '?'}, {os.cpu_count()} cores, fsync on,"
        f" synchronous_commit on, {customers} customers; HTTP into `tollhouse serve`"
    )
    print(f"{'case':48} {'events/s':>9} {'ack p50 ms':>11} {'ack p99 ms':>11}  outcomes")
    for label, rate, p50, p99, statuses in rows:
        print(f"{label:48} {rate:9.0f} {p50:11.2f} {p99:11.2f}  {statuses}")
    print(f"stored events by status: {by_status}; invoice allowances granted: {grants}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument(
        "--sse-dir",
        default=os.environ.get("SSE_DIR"),
        help="where @supabase/stripe-sync-engine@0.48.5 is npm-installed, to compare with it",
    )
    args = parser.parse_args()
    external = os.environ.get("DATABASE_URL")
    if external:
        service = os.environ.get("TOLLHOUSE_SERVICE_DATABASE_URL", external)
        asyncio.run(run(external, service, args.seconds, args.customers, args.sse_dir))
        return
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="tollhouse-bench-")) / "pgdata")
    dsn = server.start()
    try:
        service = as_user(dsn, "tollhouse_service")
        asyncio.run(run(dsn, service, args.seconds, args.customers, args.sse_dir))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
