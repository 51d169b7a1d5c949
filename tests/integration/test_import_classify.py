"""The import's set-wise steps on a real PostgreSQL: the classification (hash joins, every
outcome the same on a rerun), the credit accounts opened from the staged rows, and the
billing step's plan moves."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

from tests.support.legacy_csv import legacy_rows, render
from tollhouse.app import Tollhouse
from tollhouse.billing import BillingConfig
from tollhouse.credits import conservation_problems
from tollhouse.identity import IdentityConfig
from tollhouse.imports import ImportSummary
from tollhouse.imports.service import queries


async def run(tollhouse: Tollhouse, path: Path) -> tuple[ImportSummary, list[tuple[str, ...]]]:
    out = io.StringIO()
    summary = await tollhouse.imports.import_users(path, report=out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))[1:]
    return summary, [(r[0], r[2], r[4], r[5]) for r in rows]


async def test_the_classification_joins_by_hash_not_by_loops_of_probes(dsn: str) -> None:
    """Every join of the classification of a big file is a hash join (one pass over each
    table), however the planner would have chosen: a nested loop probes an index once per
    record."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        await conn.execute(queries["staging_memory"])
        await conn.execute(queries["create_incoming"])
        await conn.execute(queries["create_incoming_issues"])
        await conn.execute(queries["analyze_incoming"])
        await conn.execute(queries["classify_joins"], {"records": 1_000_000})
        for name in ("classify", "classify_billing"):
            cur = await conn.execute("EXPLAIN " + queries[name])
            plan = "\n".join(row[0] for row in await cur.fetchall())
            assert "Hash" in plan and "Nested Loop" not in plan, (name, plan)
            await conn.execute(queries[name])


async def test_the_accounts_step_joins_its_written_accounts_by_hash(dsn: str) -> None:
    """The staged rows have no statistics: planned for one row, the accounts step joined the
    accounts it wrote back to the batch by a nested loop (10,000 x 10,000 a batch)."""
    params = {"run_id": uuid.uuid4(), "after": 0, "through": 10_000}
    async with (
        await psycopg.AsyncConnection.connect(dsn) as conn,
        conn.transaction(force_rollback=True),
    ):
        await conn.execute(queries["accounts_joins"])
        explain = psycopg.AsyncClientCursor(conn)
        await explain.execute("EXPLAIN " + queries["apply_accounts"], params)
        lines = [row[0] for row in await explain.fetchall()]
        # (The one nested loop left is the cross join with the one row of id bases.)
        assert any("Hash Cond" in line and "acc" in line for line in lines), lines
        assert not any("Join Filter" in line for line in lines), lines
        await conn.execute(queries["accounts_joins_done"])
        cur = await conn.execute("SELECT current_setting('enable_nestloop')")
        assert await cur.fetchone() == ("on",)


async def test_a_small_file_keeps_the_planners_joins(tollhouse: Tollhouse, dsn: str) -> None:
    """Hash joins read whole tables: a file of fewer records than a tenth of the users
    leaves the planner free to probe indexes instead."""
    for i in range(20):
        await tollhouse.users.create(email=f"user{i}@example.com")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("ANALYZE tollhouse.users")
        for records, nested_loops in ((1, "on"), (2, "off"), (1_000_000, "off")):
            async with conn.transaction(force_rollback=True):
                await conn.execute(queries["classify_joins"], {"records": records})
                cur = await conn.execute("SELECT current_setting('enable_nestloop')")
                assert await cur.fetchone() == (nested_loops,), records


async def test_every_outcome_is_classified_the_same_on_a_rerun(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """A file with every outcome: the first run and a rerun classify each record as they
    should (the rerun finds the created users unchanged and the links made)."""
    outsider = await tollhouse.users.create(email="out@sider.com")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            "INSERT INTO tollhouse.identity_routes (provider, subject, user_id)"
            " VALUES ('google', 'g-outsider', %s), ('google', 'g-outsider-2', %s)",
            [outsider.id, outsider.id],
        )
    rows = list(legacy_rows(10))  # rows[i] is record i + 2
    rows[0].update(auth_provider="email", provider_user_id="")
    rows[1].update(email=rows[0]["email"], auth_provider="google", provider_user_id="g-link")
    rows[2].update(email=rows[0]["email"], auth_provider="email", provider_user_id="")
    rows[3].update(email=rows[0]["email"], auth_provider="google", provider_user_id="g-outsider-2")
    rows[5]["user_id"] = rows[4]["user_id"].upper()
    rows[6].update(auth_provider="google", provider_user_id="g-shared")
    rows[7].update(auth_provider="google", provider_user_id="g-shared")
    rows[8]["email"] = "OUT@sider.com"
    rows[9].update(auth_provider="google", provider_user_id="g-outsider")
    path = tmp_path / "users.csv"
    path.write_text(render(rows))

    first, report = await run(tollhouse, path)
    outcomes = {
        "3": ("email", "duplicate_of_record:2", "its google id is linked to that user"),
        "4": ("email", "duplicate_of_record:2", "an e-mail-provider duplicate brings nothing"),
        "5": ("email", "duplicate_of_record:2", "belongs to another user and is not linked"),
        "7": ("user_id", "duplicate_user_id", "already on record 6"),
        "9": ("provider_user_id", "duplicate_provider_user_id", "another e-mail"),
        "10": ("email", "existing_user", "already in the database"),
        "11": ("provider_user_id", "existing_identity", "another user already in the database"),
    }
    codes = {code for _, code, _ in outcomes.values()}

    def check(report: list[tuple[str, ...]], linked: str) -> None:
        expected = dict(outcomes, **{"3": (*outcomes["3"][:2], linked)})
        found = {r[0]: r for r in report if r[2] in codes}
        assert len(found) == len([r for r in report if r[2] in codes])
        assert sorted(found, key=int) == sorted(expected, key=int)
        for record_no, (column, code, message) in expected.items():
            _, got_column, got_code, got_message = found[record_no]
            assert (got_column, got_code) == (column, code)
            assert message in got_message, (record_no, got_message)

    check(report, "its google id is linked to that user")
    assert (first.created, first.merged, first.failed, first.skipped) == (3, 3, 2, 2)
    assert first.identities_linked == 1
    target = uuid.UUID(rows[0]["user_id"])
    user = await tollhouse.users.get(target)
    assert [(i.provider, i.subject) for i in user.identities] == [("google", "g-link")]

    again, report = await run(tollhouse, path)
    check(report, "its google id is linked to that user already")
    # The merged records bring nothing the second time: unchanged, as C-11 asks of a rerun,
    # and the report still says whose duplicates they are.
    assert (again.created, again.updated, again.unchanged) == (0, 0, 6)
    assert (again.merged, again.failed, again.skipped, again.identities_linked) == (0, 2, 2, 0)


async def test_a_duplicate_added_later_is_merged_only_when_it_brings_an_identity(
    tollhouse: Tollhouse, tmp_path: Path
) -> None:
    """Against a user an earlier run made, unchanged since: a new duplicate with a Google id
    to link is merged (it changes the user), a new e-mail-provider one changes nothing and is
    unchanged, with the report naming the record it duplicates."""
    rows = list(legacy_rows(3))
    rows[0].update(auth_provider="email", provider_user_id="")
    path = tmp_path / "users.csv"
    path.write_text(render(rows[:1]))
    first, _ = await run(tollhouse, path)
    assert first.created == 1
    rows[1].update(email=rows[0]["email"], auth_provider="google", provider_user_id="g-late")
    rows[2].update(email=rows[0]["email"], auth_provider="email", provider_user_id="")
    path.write_text(render(rows))
    second, report = await run(tollhouse, path)
    assert (second.created, second.updated, second.unchanged) == (0, 0, 2)
    assert (second.merged, second.identities_linked) == (1, 1)
    user = await tollhouse.users.get(uuid.UUID(rows[0]["user_id"]))
    assert [(i.provider, i.subject) for i in user.identities] == [("google", "g-late")]
    assert [(r[0], r[2]) for r in report if r[2].startswith("duplicate_of")] == [
        ("3", "duplicate_of_record:2"),
        ("4", "duplicate_of_record:2"),
    ]
    third, report = await run(tollhouse, path)
    assert (third.unchanged, third.merged, third.identities_linked) == (3, 0, 0)
    assert [(r[0], r[3]) for r in report if r[2].startswith("duplicate_of")] == [
        (
            "3",
            "already merged into the user of record 2; its google id is linked to that user"
            " already",
        ),
        (
            "4",
            "already merged into the user of record 2; an e-mail-provider duplicate brings nothing",
        ),
    ]


async def test_a_rerun_under_another_time_zone_and_date_style_finds_every_record_unchanged(
    tollhouse: Tollhouse,
    dsn: str,
    service_dsn: str,
    identity_config: IdentityConfig,
    billing_config: BillingConfig,
    tmp_path: Path,
) -> None:
    """The fingerprint hashes the text of timestamps, which follows the session's TimeZone
    and DateStyle: a database (or PGTZ) set to another zone made a rerun update every
    record. The pool's connections count in UTC and write ISO whatever the database says
    (tollhouse.db.pool), as the fingerprints of earlier runs were made by default."""
    rows = list(legacy_rows(5))
    rows[0]["last_login_at"] = "2024-03-31T01:30:00.25+01:00"  # fractional seconds too
    path = tmp_path / "users.csv"
    path.write_text(render(rows))
    first, _ = await run(tollhouse, path)
    assert first.created == 5
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT current_database()")
        name = sql.Identifier(str((await cur.fetchone() or [""])[0]))
        await conn.execute(
            sql.SQL("ALTER DATABASE {} SET timezone TO 'Pacific/Chatham'").format(name)
        )
        await conn.execute(sql.SQL("ALTER DATABASE {} SET datestyle TO 'SQL, DMY'").format(name))
    async with Tollhouse.open(
        service_dsn, min_size=1, max_size=2, identity=identity_config, billing=billing_config
    ) as elsewhere:
        async with elsewhere.db.connection() as conn:
            cur = await conn.execute(
                "SELECT current_setting('TimeZone'), current_setting('DateStyle')"
            )
            assert await cur.fetchone() == ("UTC", "ISO, MDY")
        again, _ = await run(elsewhere, path)
    assert (again.unchanged, again.updated) == (5, 0)


async def test_opening_accounts_write_what_the_credits_function_writes(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """The accounts opened from the staged rows: the balance as one `import` grant and its
    ledger row with the legacy metadata, the period from monthly_reset_at, nothing for a
    zero balance; conservation holds."""
    rows = list(legacy_rows(3))
    rows[0].update(credits_balance="250", credits_remaining="250", plan_tier="pro")
    rows[0].update(credits_total="5000", daily_credit_limit="40")
    rows[0].update(monthly_reset_at="2031-03-15T00:00:00Z")
    rows[1].update(credits_balance="0", credits_remaining="0")
    path = tmp_path / "users.csv"
    path.write_text(render(rows))
    summary, _ = await run(tollhouse, path)
    assert summary.created == 3
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT t.owner_user_id, a.plan, a.balance, a.daily_cap, a.period_start,"
            " a.period_end, a.allowance_for = a.period_start, g.source, g.source_id, g.total,"
            " l.kind, l.reason, l.delta, l.balance_after, l.grant_id = g.id, l.metadata"
            " FROM tollhouse.credit_accounts a JOIN tollhouse.tenants t ON t.id = a.tenant_id"
            " LEFT JOIN tollhouse.credit_grants g ON g.tenant_id = a.tenant_id"
            " LEFT JOIN tollhouse.credit_ledger l ON l.tenant_id = a.tenant_id"
            " WHERE t.owner_user_id = ANY(%s)",
            [[uuid.UUID(r["user_id"]) for r in rows[:2]]],
        )
        found = {row[0]: row[1:] for row in await cur.fetchall()}
        assert await conservation_problems(conn) == []
        # Bulk ids are tollhouse.uuid7_seq(base, n): tenants by apply_no (user_id order),
        # grants and ledger rows by tenant among the balances above 0 (one batch, offset 0).
        cur = await conn.execute(
            "SELECT bool_and(tollhouse.uuid7_seq(id, n) = id), count(*) FROM ("
            " SELECT t.id, row_number() OVER (ORDER BY t.owner_user_id) AS n"
            " FROM tollhouse.tenants t WHERE t.owner_user_id = ANY(%(users)s)"
            " UNION ALL SELECT g.id, row_number() OVER (ORDER BY g.tenant_id)"
            " FROM tollhouse.credit_grants g WHERE g.source = 'import'"
            " UNION ALL SELECT l.id, row_number() OVER (ORDER BY l.tenant_id)"
            " FROM tollhouse.credit_ledger l WHERE l.reason = 'grant.import') ids",
            {"users": [uuid.UUID(r["user_id"]) for r in rows]},
        )
        assert await cur.fetchone() == (True, 3 + 2 + 2)
    user_id = uuid.UUID(rows[0]["user_id"])
    plan, balance, cap, start, end, allowance, *grant, metadata = found[user_id]
    assert (plan, balance, cap, allowance) == ("pro", 250, 40, True)
    assert end == datetime(2031, 3, 15, tzinfo=UTC) and start == datetime(2031, 2, 15, tzinfo=UTC)
    assert grant == ["import", f"import:{user_id}", 250, "grant", "grant.import", 250, 250, True]
    assert metadata["record_no"] == 2 and metadata["legacy_tier"] == "pro"
    assert metadata["credits_total"] == 5000 and uuid.UUID(metadata["import_run"])
    zero = found[uuid.UUID(rows[1]["user_id"])]
    assert zero[1] == 0 and zero[6:] == (None,) * 9


async def test_a_subscriber_whose_period_ended_still_gets_the_account_maintenance(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """The billing step skips only the plan moves that would change nothing: an account on
    its plan whose period ended still goes through credit_change_plan_v1 (a new period and
    its allowance), a canceled one still moves to free, an active one in its period stays."""
    rows = list(legacy_rows(3))
    for i, (status, reset) in enumerate(
        (("active", "2020-01-10T00:00:00Z"), ("canceled", ""), ("active", ""))
    ):
        rows[i].update(
            plan_tier="pro",
            stripe_customer_id=f"cus_m{i}",
            stripe_subscription_id=f"sub_m{i}",
            billing_status=status,
            monthly_reset_at=reset or "2031-01-10T00:00:00Z",
        )
    path = tmp_path / "users.csv"
    path.write_text(render(rows))
    summary, _ = await run(tollhouse, path)
    assert summary.created == 3 and summary.billing_subscriptions == 3
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT a.plan, a.period_end > now(),"
            " (SELECT array_agg(l.reason ORDER BY l.reason) FROM tollhouse.credit_ledger l"
            "  WHERE l.tenant_id = a.tenant_id)"
            " FROM tollhouse.credit_accounts a JOIN tollhouse.tenants t ON t.id = a.tenant_id"
            " WHERE t.owner_user_id = %s",
            [uuid.UUID(rows[0]["user_id"])],
        )
        renewed = await cur.fetchone()
        assert await conservation_problems(conn) == []
    assert renewed is not None and renewed[:2] == ("pro", True)
    assert "grant.plan" in renewed[2]
    plans = [(await tollhouse.credits.balance(user_id=uuid.UUID(r["user_id"]))).plan for r in rows]
    assert plans == ["pro", "free", "pro"]


async def test_progress_says_when_applying_starts(tollhouse: Tollhouse, tmp_path: Path) -> None:
    """The applying phase is reported as it starts (0 applied), before its first batch."""
    path = tmp_path / "users.csv"
    path.write_text(render(list(legacy_rows(5))))
    calls: list[tuple[str, int, int]] = []
    await tollhouse.imports.import_users(
        path, batch_size=2, progress=lambda *call: calls.append(call)
    )
    applying = [call for call in calls if call[0] == "applying"]
    assert applying[0] == ("applying", 0, 5) and applying[-1] == ("applying", 5, 5)
    assert calls.index(applying[0]) == max(i for i, c in enumerate(calls) if c[0] == "staging") + 1
