"""Migration 0014 rewrote the plan change and the paid invoice's allowance in fewer
statements. Both are run here against the definitions they replaced (0004, 0006), on the
same random states: the same answers, accounts, grants and ledger rows."""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

import tollhouse.db.migrations as migrations
from tests.support.credit_state import CREDIT_STATE

MIGRATIONS = Path(migrations.__file__).parent
PLANS = ("free", "starter", "pro", "power")


def _before(filename: str, name: str) -> str:
    """The first definition of function `name`, renamed `name_before`."""
    text = (MIGRATIONS / filename).read_text()
    found = re.search(rf"CREATE FUNCTION tollhouse\.{name}\(.*?\n\$\$;\n", text, re.S)
    assert found is not None, f"{name} is not in {filename}"
    return found.group(0).replace(f"tollhouse.{name}(", f"tollhouse.{name}_before(", 1)


STATE = (
    "SELECT"
    + CREDIT_STATE
    + """,
       (SELECT row(allowance_granted_at IS NOT NULL, allowance_credits)::text
        FROM tollhouse.invoices WHERE tenant_id = %(t)s AND id = %(i)s)
"""
)


def _both(conn: psycopg.Connection[Any], call: str, params: dict[str, Any]) -> tuple[Any, Any]:
    """Runs `call` with the function before 0014 (`{fn}` = ..._before) and as it is now, on
    the same state; returns (answer, state) of each. The current one's effects stay."""
    conn.execute("SAVEPOINT before")
    old = conn.execute(call.format(fn="_before"), params).fetchall()
    old_state = conn.execute(STATE, params).fetchone()
    conn.execute("ROLLBACK TO SAVEPOINT before")
    new = conn.execute(call.format(fn=""), params).fetchall()
    new_state = conn.execute(STATE, params).fetchone()
    return (old, old_state), (new, new_state)


def _balance_and_expiries(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> tuple[int, int]:
    """The tenant's balance and its count of expiries by a plan change."""
    row = conn.execute(
        "SELECT c.balance, (SELECT count(*) FROM tollhouse.credit_ledger l"
        " WHERE l.tenant_id = c.tenant_id AND l.kind = 'expiry' AND l.reason = 'plan_change')"
        " FROM tollhouse.credit_accounts c WHERE c.tenant_id = %s",
        (tenant,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _random_walk(
    conn: psycopg.Connection[Any],
    rng: random.Random,
    tenant: uuid.UUID,
    steps: int,
    script: list[str] | None = None,
) -> dict[str, int]:
    """Debits (into debt on plans with an overdraft), purchases, a period that ends, plan
    changes and paid invoices on one tenant, comparing each change and allowance. A
    `script` of actions (`change:PLAN`, `overdraw`) replaces the random choices."""
    seen = {
        "changes": 0,
        "changed": 0,
        "expiries": 0,
        "debt_repaid": 0,
        "debt_kept": 0,
        "allowances": 0,
    }
    conn.execute("SELECT tollhouse.credit_account_v1(%s)", (tenant,))
    for step in range(len(script) if script else steps):
        action = (
            script[step]
            if script
            else rng.choice(["debit", "debit", "purchase", "age", "change", "change", "invoice"])
        )
        params: dict[str, Any] = {"t": tenant, "i": f"in_{step}"}
        if action.startswith("change:"):
            action, params["plan"] = action.split(":")
        if action in ("debit", "overdraw"):
            # Some amount, or all that is left and a bit of the overdraft when there is one.
            conn.execute(
                "SELECT tollhouse.credit_debit_v1(%(t)s, NULL, CASE WHEN %(all)s"
                " THEN greatest(1, balance + (overdraft_limit + 1) / 2) ELSE %(amount)s END,"
                " %(turn)s, NULL, 'usage', '{}') FROM tollhouse.credit_accounts"
                " WHERE tenant_id = %(t)s",
                {
                    "t": tenant,
                    "all": action == "overdraw" or rng.random() < 0.5,
                    "amount": rng.choice([5, 40, 300, 900]),
                    "turn": f"{tenant}-{step}",
                },
            )
        elif action == "purchase":
            conn.execute(
                "SELECT tollhouse.credit_apply_grant_v1(%s, %s, 'purchase', %s, 1,"
                " now() + interval '1 year', 'grant.purchase', NULL)",
                (tenant, rng.choice([10, 250]), f"pack-{step}"),
            )
        elif action == "age":
            # The period ended a second ago, with its allowance: the next call renews it
            # lazily (both versions alike), from a start no earlier period had. (The grants'
            # update joins the account as the statement found it: the old period's end.)
            conn.execute(
                "WITH a AS (UPDATE tollhouse.credit_accounts c SET created_at = now()"
                " - interval '1 month' - %(n)s * interval '1 minute',"
                " period_start = now() - interval '1 month 1 second',"
                " period_end = now() - interval '1 second' WHERE c.tenant_id = %(t)s)"
                " UPDATE tollhouse.credit_grants g SET expires_at = now() - interval '1 second'"
                " FROM tollhouse.credit_accounts c"
                " WHERE g.tenant_id = %(t)s AND c.tenant_id = %(t)s"
                " AND g.expires_at = c.period_end",
                {"t": tenant, "n": step},
            )
        elif action == "change":
            params.setdefault("plan", rng.choice(PLANS))
            balance, expiries = _balance_and_expiries(conn, tenant)
            old, new = _both(
                conn,
                "SELECT * FROM tollhouse.credit_change_plan_v1{fn}(%(t)s, NULL, %(plan)s)",
                params,
            )
            assert new == old, (step, params["plan"])
            seen["changes"] += 1
            seen["changed"] += bool(new[0] and new[0][0][3])
            seen["expiries"] += _balance_and_expiries(conn, tenant)[1] - expiries
            seen["debt_repaid"] += bool(balance < 0 and new[0] and new[0][0][3])
            seen["debt_kept"] += bool(new[0] and new[0][0][3] and new[0][0][2] < 0)
        else:
            start = rng.choice(["-20 days", "-2 days", "+0 days"])
            end = rng.choice(["+10 days", "+30 days", "-1 day"])
            conn.execute(
                "INSERT INTO tollhouse.invoices (tenant_id, id, customer_id, plan, paid,"
                " period_start, period_end, stripe_at) VALUES (%s, %s, 'cus_x', %s, true,"
                " now() + %s::interval, now() + %s::interval, now())",
                (tenant, params["i"], rng.choice(PLANS), start, end),
            )
            old, new = _both(
                conn,
                "SELECT * FROM tollhouse.billing_invoice_allowance_v1{fn}(%(t)s, %(i)s)",
                params,
            )
            assert new == old, (step, start, end)
            seen["allowances"] += bool(new[0] and new[0][0][0])
    return seen


async def test_plan_changes_and_allowances_decide_as_before(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(_before("0004_credits.sql", "credit_change_plan_v1"))
        conn.execute(_before("0006_billing.sql", "billing_invoice_allowance_v1"))
        conn.execute("UPDATE tollhouse.plans SET overdraft_limit = 200 WHERE name = 'starter'")
        rng = random.Random(14)
        totals: dict[str, int] = {}
        for n in range(40):
            tenant = uuid.uuid4()
            owner = uuid.uuid4()
            conn.execute(
                "INSERT INTO tollhouse.tenants (id, name, owner_user_id, is_default)"
                " VALUES (%s, %s, %s, true)",
                (tenant, f"walk {n}", owner),
            )
            for key, value in _random_walk(conn, rng, tenant, 40).items():
                totals[key] = totals.get(key, 0) + value
        # A debt deeper than the new plan's overdraft, and no allowance left to repay it.
        for target in PLANS:
            tenant = uuid.uuid4()
            conn.execute(
                "INSERT INTO tollhouse.tenants (id, name, owner_user_id, is_default)"
                " VALUES (%s, 'deep', %s, true)",
                (tenant, uuid.uuid4()),
            )
            script = ["change:power", "overdraw", "overdraw", f"change:{target}"]
            for key, value in _random_walk(conn, rng, tenant, 0, script).items():
                totals[key] = totals.get(key, 0) + value
        conn.rollback()
    # The walks reached every branch: changes that moved and that did not, expiries of a
    # live allowance, a debt repaid from the new allowance, a debt the new plan's overdraft
    # must cover, invoices that granted.
    assert totals["changes"] > totals["changed"] > 20, totals
    assert totals["expiries"] > 10, totals
    assert totals["debt_repaid"] > 0, totals
    assert totals["debt_kept"] > 3, totals
    assert totals["allowances"] > 5, totals


def test_racing_moves_end_on_the_effective_plan(dsn: str) -> None:
    """Two transactions change one tenant's subscriptions and move its account: the one that
    waits for the other's lock reads the effective plan after it, so the account ends on the
    plan the committed subscriptions give (reading it before the lock ended on `free` here,
    with a `power` subscription active)."""
    tenant = uuid.uuid4()
    insert = (
        "INSERT INTO tollhouse.subscriptions (tenant_id, id, customer_id, status, plan,"
        " stripe_at, current_period_end) VALUES (%s, %s, 'cus_race', 'active', %s, now(),"
        " now() + %s::interval)"
    )
    sync = "SELECT tollhouse.billing_sync_plan_v1(%s)"
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute(
            "INSERT INTO tollhouse.tenants (id, name, owner_user_id, is_default)"
            " VALUES (%s, 'race', %s, true)",
            (tenant, uuid.uuid4()),
        )
        setup.execute(insert, (tenant, "sub_a", "pro", "10 days"))
        setup.execute(sync, (tenant,))
    with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        first.execute(insert, (tenant, "sub_b", "power", "30 days"))
        first.execute(sync, (tenant,))  # holds the account's lock
        second.execute(
            "UPDATE tollhouse.subscriptions SET status = 'canceled'"
            " WHERE tenant_id = %s AND id = 'sub_a'",
            (tenant,),
        )
        second.execute("SET lock_timeout = '20s'")
        waiting = threading.Thread(target=lambda: second.execute(sync, (tenant,)))
        waiting.start()
        _wait_for_lock(dsn, second.info.backend_pid)
        first.commit()
        waiting.join()
        second.commit()
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT c.plan, tollhouse.billing_effective_plan_v1(c.tenant_id)"
            " FROM tollhouse.credit_accounts c WHERE c.tenant_id = %s",
            (tenant,),
        ).fetchone()
    assert row == ("power", "power")


def _wait_for_lock(dsn: str, pid: int) -> None:
    """Until backend `pid` waits for a lock (10 s at most)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(1000):
            waiting = conn.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for a lock")
