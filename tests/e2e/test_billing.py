"""Billing as an operator meets it: `tollhouse serve` killed right after acknowledging a
webhook (W-10), and the `tollhouse stripe` commands against the fake Stripe."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.e2e.conftest import Service, clean_env, error_lines, run_cli, start_service
from tests.support import billing as b
from tests.support import fake_stripe as fs


def _post(url: str, event: dict[str, Any]) -> httpx.Response:
    body = json.dumps(event)
    return httpx.post(f"{url}/v1/stripe/webhook", content=body, headers=fs.sign(body), timeout=10)


def _count(dsn: str, sql: Any, *params: Any) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def _user(env: dict[str, str]) -> str:
    created = run_cli(["users", "create", "--email", "kill@example.com"], env)
    assert created.returncode == 0, created.stderr
    user_id: str = json.loads(created.stdout)["id"]
    return user_id


def test_w10_an_acknowledged_event_survives_sigkill_and_a_retry_applies_once(
    tmp_path: Path, dsn: str, services: list[Service]
) -> None:
    env = clean_env(
        tmp_path, DATABASE_URL=dsn, TOLLHOUSE_STRIPE_WEBHOOK_SECRET=f"{fs.OTHER_SECRET},{fs.SECRET}"
    )
    user_id = _user(env)
    first = start_service(env, tmp_path)
    services.append(first)
    first.wait_ready(60)
    customer = fs.new_id("cus")
    session = b.subscription_session(customer, user_id)
    assert _post(first.url, fs.event("checkout.session.completed", session)).status_code == 200
    start, end = b.period()
    pro = b.PRICES[b.PRO]
    sub = fs.subscription("sub_kill", customer, pro, start=start, end=end)
    created = fs.event("customer.subscription.created", sub)
    answer = _post(first.url, created)
    assert answer.status_code == 200
    first.process.send_signal(signal.SIGKILL)  # right after the acknowledgement
    first.process.wait(10)
    assert (
        _count(
            dsn,
            "SELECT count(*) FROM tollhouse.billing_events WHERE status = 'processed'"
            " AND stripe_event_id = %s",
            created["id"],
        )
        == 1
    )
    assert _count(dsn, "SELECT count(*) FROM tollhouse.subscriptions WHERE id = 'sub_kill'") == 1

    # Killed while a delivery is in flight: no 2xx reached Stripe, so Stripe sends it again.
    second = start_service(env, tmp_path)
    services.append(second)
    second.wait_ready(60)
    paid = fs.event(
        "invoice.paid", fs.invoice("in_kill", customer, "sub_kill", pro, start=start, end=end)
    )
    # All of the request but its last byte has reached the service when it is killed: the
    # delivery is in flight, deterministically (a request sent from a thread could also be
    # killed before it left, and then prove nothing).
    body = json.dumps(paid).encode()
    host, port = second.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /v1/stripe/webhook HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\n"
            f"Stripe-Signature: {fs.sign(body.decode())['Stripe-Signature']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[:-1])
        time.sleep(0.3)  # time to read it; nothing can be stored before the last byte
        second.process.send_signal(signal.SIGKILL)
        second.process.wait(10)
        assert sock.recv(1024) == b""  # closed without an answer: Stripe will send it again
    assert (
        _count(
            dsn,
            "SELECT count(*) FROM tollhouse.billing_events WHERE stripe_event_id = %s",
            paid["id"],
        )
        == 0
    )
    third = start_service(env, tmp_path)
    services.append(third)
    third.wait_ready(60)
    # Stripe's retries: the delivery cut short was never stored, so its first retry applies
    # it, once.
    assert [_post(third.url, paid).json()["status"] for _ in range(2)] == [
        "processed",
        "duplicate",
    ]
    grants = "SELECT count(*) FROM tollhouse.credit_grants WHERE source_id = %s"
    assert _count(dsn, grants, "stripe:invoice:in_kill") == 1

    # Killed while a delivery is being applied: the event's lock, held here, keeps the
    # service's call waiting inside PostgreSQL when the service dies. Its transaction then
    # commits or not (whether its COMMIT had reached the server); no 2xx was sent either way.
    renewal = fs.event(
        "invoice.paid",
        fs.invoice("in_kill2", customer, "sub_kill", pro, start=end, end=end + 30 * 86400),
    )
    lock = f"tollhouse.stripe_event:{renewal['id']}"
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (lock,))
        sender = threading.Thread(target=_try_post, args=(third.url, renewal), daemon=True)
        sender.start()
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        deadline = time.monotonic() + 30
        while _count(dsn, waiting) == 0:
            assert time.monotonic() < deadline, "the delivery never reached its lock"
            time.sleep(0.05)
        third.process.send_signal(signal.SIGKILL)
        third.process.wait(10)
        holder.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (lock,))
    sender.join(10)

    fourth = start_service(env, tmp_path)
    services.append(fourth)
    fourth.wait_ready(60)
    # Stripe's retries: the one killed while applied is applied now or was then, once.
    for _ in range(2):
        retry = _post(fourth.url, renewal)
        assert retry.status_code == 200
        assert retry.json()["status"] in ("processed", "duplicate")
    assert _count(dsn, grants, "stripe:invoice:in_kill2") == 1
    assert _post(fourth.url, created).json()["status"] == "duplicate"
    mystery = fs.subscription("sub_m", customer, fs.price("price_m"), start=start, end=end)
    failing = fs.event("customer.subscription.created", mystery)
    assert _post(fourth.url, failing).json()["status"] == "failed"
    fourth.stop(signal.SIGTERM)

    listed = run_cli(["stripe", "events", "--status", "failed"], env)
    assert failing["id"] in listed.stdout and "unknown price price_m" in listed.stdout
    replayed = run_cli(["stripe", "replay"], env)
    assert replayed.returncode == 0
    assert f"{failing['id']}" in replayed.stdout and "1 event(s) replayed" in replayed.stdout
    everything = run_cli(["stripe", "events"], env).stdout
    assert created["id"] in everything and paid["id"] in everything


def _try_post(url: str, event: dict[str, Any]) -> None:
    """A delivery whose service may die before it answers."""
    with contextlib.suppress(httpx.HTTPError):
        _post(url, event)


def test_stripe_commands(tmp_path: Path, dsn: str) -> None:
    with fs.serve() as fake:
        env = clean_env(
            tmp_path,
            DATABASE_URL=dsn,
            TOLLHOUSE_STRIPE_API_KEY="sk_test_cli",
            TOLLHOUSE_STRIPE_API_BASE=fake.url,
        )
        user_id = _user(env)
        customer = fs.shape(
            "customer", id=fs.new_id("cus"), metadata={"tollhouse_user_id": user_id}
        )
        the_price = fs.price("price_cli", tollhouse_plan="starter")
        start, end = b.period()
        subscription = fs.subscription("sub_cli", customer["id"], the_price, start=start, end=end)
        for obj in (customer, the_price, subscription):
            obj["created"] = start  # after --since below (the fake lists as Stripe does)
        fake.put("customers", customer)
        fake.put("prices", the_price)
        fake.put("subscriptions", subscription)
        synced = run_cli(["stripe", "sync", "--since", "2020-01-01"], env)
        assert synced.returncode == 0, synced.stderr
        lines = dict(line.split() for line in synced.stdout.splitlines())
        assert lines["subscriptions"] == "1" and lines["customers"] == "1"
        plan = _count(
            dsn,
            "SELECT count(*) FROM tollhouse.subscriptions WHERE id = 'sub_cli' AND plan = %s",
            "starter",
        )
        assert plan == 1
        wrong = run_cli(["stripe", "replay", "--status", "processed"], env)
        assert wrong.returncode == 1
        assert error_lines(wrong.stderr) == [
            "tollhouse: error: status must be failed, received or parked"
        ]
        bad_date = run_cli(["stripe", "sync", "--since", "yesterday"], env)
        assert bad_date.returncode == 2
        no_key = run_cli(["stripe", "sync"], clean_env(tmp_path, DATABASE_URL=dsn))
        assert no_key.returncode == 1
        assert "TOLLHOUSE_STRIPE_API_KEY" in error_lines(no_key.stderr)[0]
