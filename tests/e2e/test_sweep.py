"""L-08: the monthly renewal over 10,000 accounts, five sweeps at once, then a sweep killed
with SIGKILL halfway and run again: exactly one renewal per account and period, none missed."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psycopg

from tests.e2e.conftest import TOLLHOUSE, clean_env, run_cli

ACCOUNTS = 10_000
SETUP = """
INSERT INTO tollhouse.tenants (id, name, slug, owner_user_id)
SELECT gen_random_uuid(), 'sweep ' || n, 'sweep-' || n, gen_random_uuid()
FROM generate_series(1, %(n)s) n;
SELECT count(*) FROM tollhouse.tenants t, LATERAL tollhouse.credit_account_v1(t.id)
WHERE NOT t.is_default
"""
#: A month and a day pass for every account: its period ends and its allowance expires.
MONTH_PASSES = """
UPDATE tollhouse.credit_accounts
SET created_at = created_at - interval '1 month 1 day',
    period_start = period_start - interval '1 month 1 day',
    period_end = period_end - interval '1 month 1 day',
    allowance_for = allowance_for - interval '1 month 1 day';
UPDATE tollhouse.credit_grants SET expires_at = expires_at - interval '1 month 1 day'
"""


def _execute(conn: psycopg.Connection[tuple[object, ...]], script: str) -> None:
    for statement in filter(str.strip, script.split(";")):
        conn.execute(statement, {"n": ACCOUNTS} if "%(n)s" in statement else None)


def _renewals(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[int, int, int]:
    """(accounts, plan grants, accounts whose plan grants are not one per period)."""
    row = conn.execute(
        """
        SELECT count(DISTINCT a.tenant_id),
               (SELECT count(*) FROM tollhouse.credit_grants WHERE source = 'plan'),
               (SELECT count(*) FROM (
                    SELECT g.tenant_id FROM tollhouse.credit_grants g WHERE g.source = 'plan'
                    GROUP BY g.tenant_id HAVING count(*) <> count(DISTINCT g.source_id)) d)
        FROM tollhouse.credit_accounts a
        """
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])  # type: ignore[call-overload]


def test_l08_renewal_of_10000_accounts_concurrent_and_after_sigkill(
    tmp_path: Path, dsn: str
) -> None:
    env = clean_env(tmp_path, DATABASE_URL=dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        _execute(conn, SETUP)
        assert _renewals(conn) == (ACCOUNTS, ACCOUNTS, 0)

        # Five sweeps at once: each account renewed exactly once.
        _execute(conn, MONTH_PASSES)
        sweeps = [
            subprocess.Popen([TOLLHOUSE, "credits", "sweep"], env=env, stdout=subprocess.DEVNULL)
            for _ in range(5)
        ]
        assert all(p.wait(timeout=300) == 0 for p in sweeps)
        assert _renewals(conn) == (ACCOUNTS, 2 * ACCOUNTS, 0)

        # A sweep killed halfway, then run again: the rest, and nothing twice.
        _execute(conn, MONTH_PASSES)
        victim = subprocess.Popen(
            [TOLLHOUSE, "credits", "sweep"], env=env, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while _renewals(conn)[1] < 2 * ACCOUNTS + ACCOUNTS // 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        partial = _renewals(conn)[1] - 2 * ACCOUNTS
        assert 0 < partial < ACCOUNTS, partial  # it really died halfway
        rerun = run_cli(["credits", "sweep"], env, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert _renewals(conn) == (ACCOUNTS, 3 * ACCOUNTS, 0)
        doctor = run_cli(["doctor"], env)
        assert "credits" in doctor.stdout and doctor.returncode == 0, doctor.stdout
