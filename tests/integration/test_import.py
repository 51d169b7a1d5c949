"""The import on a real PostgreSQL (RELIABILITY 7.3): what it writes, merges, skips and
reports; idempotence; dry runs; conservation of credits afterwards."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import psycopg
import pytest

from tests.support.import_state import checksum, counts, duplicate_keys
from tests.support.legacy_csv import legacy_rows, render, write_legacy_csv
from tollhouse.app import Tollhouse
from tollhouse.credits import DebitRequest, conservation_problems
from tollhouse.errors import ImportFileRejected, InvalidRequest
from tollhouse.imports import ImportSummary

REPORT_HEADER = "record_no,line_no,column,value,code,message"


def write(tmp_path: Path, text: str | bytes, name: str = "users.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


async def run(
    tollhouse: Tollhouse, path: Path, **options: object
) -> tuple[ImportSummary, list[list[str]]]:
    out = io.StringIO()
    summary = await tollhouse.imports.import_users(path, report=out, **options)  # type: ignore[arg-type]
    lines = out.getvalue().split("\r\n")
    assert lines[0] == REPORT_HEADER and lines[-1] == ""
    rows = list(csv.reader(io.StringIO(out.getvalue())))[1:]
    return summary, rows


def total(summary: ImportSummary) -> int:
    return (
        summary.created
        + summary.updated
        + summary.unchanged
        + summary.merged
        + summary.skipped
        + summary.failed
    )


async def test_a_created_user_has_every_row_a_new_user_has(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    row = next(legacy_rows(1))
    row.update(
        display_name="Ada",
        auth_provider="google",
        provider_user_id="g-1",
        plan_tier="enterprise",
        credits_total="20000",
        credits_balance="1234",
        credits_remaining="1234",
        daily_credit_limit="300",
        credits_last_reset="2025-06-01T23:30:00-02:00",  # 2 June in UTC
        monthly_reset_at="2030-07-15T00:00:00Z",
        newsletter_opt_in="false",
        account_status="suspended",
        stripe_customer_id="",
        stripe_subscription_id="",
        billing_status="",
    )
    summary, report = await run(tollhouse, write(tmp_path, render([row])))
    assert summary.created == 1 and total(summary) == summary.records_read == 1
    assert [r[4] for r in report] == ["plan_override"]

    user_id = uuid.UUID(row["user_id"])
    user = await tollhouse.users.get(user_id, include_deleted=True)
    assert user.display_name == "Ada" and user.status == "suspended"
    assert user.created_at == datetime.fromisoformat(row["created_at"])
    assert user.last_seen_at == datetime.fromisoformat(row["last_login_at"])
    assert user.plan_override == "power" and user.roles == ["user"]
    (email,) = user.emails
    assert (email.email, email.is_primary, email.verified, email.via) == (
        row["email"].lower(),
        True,
        False,
        "import",
    )
    (identity,) = user.identities
    assert (identity.provider, identity.subject) == ("google", "g-1")
    assert (await tollhouse.users.find_by_identity("google", "g-1")) is not None
    assert not (await tollhouse.users.preferences(user_id)).marketing
    assert user.personal_tenant_id is not None

    balance = await tollhouse.credits.balance(user_id=user_id)
    assert (balance.balance, balance.plan, balance.daily_cap) == (1234, "power", 300)
    assert balance.period_end.isoformat() == "2030-07-15T00:00:00+00:00"
    with psycopg.connect(dsn) as conn:
        day_start = conn.execute(
            "SELECT a.day_start FROM tollhouse.credit_accounts a WHERE a.tenant_id = %s",
            [user.personal_tenant_id],
        ).fetchone()
    assert day_start == (date(2025, 6, 2),)  # the UTC day of credits_last_reset
    assert [(g.source, g.source_id, g.remaining) for g in balance.grants] == [
        ("import", f"import:{user_id}", 1234)
    ]
    entries, _ = await tollhouse.credits.ledger(user_id=user_id)
    assert [(e.kind, e.reason, e.delta, e.balance_after) for e in entries] == [
        ("grant", "grant.import", 1234, 1234)
    ]
    # The imported balance stands for this period's allowance: no plan grant on top.
    assert balance.grants[0].source == "import" and len(balance.grants) == 1
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        assert await conservation_problems(conn) == []
    checks = {c.name: c.ok for c in await tollhouse.health.doctor()}
    assert checks["credits"] and all(checks.values())


async def test_c05_duplicates_by_email_and_an_existing_user(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    existing = await tollhouse.users.create(email="BOB@x.com")
    rows = list(legacy_rows(40))
    for i, spelling in ((0, "Bob@x.com"), (7, " bob@X.COM "), (38, "bob@x.com")):
        rows[i]["email"] = spelling  # records 2, 9 and 40
    before = counts(dsn)
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    after = counts(dsn)
    assert after["users"] - before["users"] == 37  # 40 records, three of them Bob
    assert after["user_identities"] - before["user_identities"] == sum(
        1 for i, r in enumerate(rows) if r["auth_provider"] != "email" and i not in (0, 7, 38)
    )
    bob = [r for r in report if r[0] in ("2", "9", "40") and r[2] == "email"]
    assert [(r[0], r[4]) for r in bob] == [
        ("2", "existing_user"),
        ("9", "duplicate_of_record:2"),
        ("40", "duplicate_of_record:2"),
    ]
    assert all(r[3] == "b***@x.com" for r in bob)
    assert summary.skipped == 3 and summary.created == 37 and total(summary) == 40
    assert (await tollhouse.users.find_by_email("bob@x.com")) == existing


async def test_c05_later_google_and_apple_ids_join_the_first_user(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    rows = list(legacy_rows(4))
    for row in rows:
        row["email"] = "Carol@Example.com"
    rows[0].update(auth_provider="email", provider_user_id="", credits_balance="10")
    rows[1].update(auth_provider="google", provider_user_id="g-carol", credits_balance="500")
    rows[2].update(auth_provider="apple", provider_user_id="a-carol", credits_balance="700")
    rows[3].update(auth_provider="email", provider_user_id="", credits_balance="900")
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    assert (summary.created, summary.merged, summary.identities_linked) == (1, 3, 2)
    first = uuid.UUID(rows[0]["user_id"])
    user = await tollhouse.users.get(first)
    assert sorted((i.provider, i.subject) for i in user.identities) == [
        ("apple", "a-carol"),
        ("google", "g-carol"),
    ]
    for other in rows[1:]:
        with pytest.raises(Exception, match="no user"):
            await tollhouse.users.get(uuid.UUID(other["user_id"]))
    # Only the first record's balance: a duplicate grants nothing to another's account.
    assert (await tollhouse.credits.balance(user_id=first)).balance == 10
    merged = [(r[0], r[4]) for r in report if r[4].startswith("duplicate_of")]
    assert merged == [(n, "duplicate_of_record:2") for n in ("3", "4", "5")]
    assert "brings nothing" in next(r[5] for r in report if r[0] == "5" and r[2] == "email")


def apple(row: dict[str, str], subject: str, email: str = "") -> dict[str, str]:
    """`row` as an Apple record, without an e-mail unless one is given."""
    row.update(auth_provider="apple", provider_user_id=subject, email=email)
    return row


def address_rows(dsn: str, user_id: uuid.UUID) -> tuple[object, ...]:
    """A user's e-mails and e-mail routes, and its identities with their e-mails."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM tollhouse.user_emails WHERE user_id = %(u)s),"
            " (SELECT count(*) FROM tollhouse.email_routes WHERE user_id = %(u)s),"
            " (SELECT array_agg(provider || ':' || subject || ':' || coalesce(email, '-')"
            "  ORDER BY subject) FROM tollhouse.user_identities WHERE user_id = %(u)s)",
            {"u": user_id},
        ).fetchone()
    assert row is not None
    return tuple(row)


async def test_an_apple_record_without_an_email_is_a_user_with_its_identity_only(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """Seed 001: Apple may give the address on the first login only. The user is created
    with every row a new user has except an e-mail (as UserService.create without one)."""
    row = apple(next(legacy_rows(1)), "a-ann")
    row.update(credits_balance="42", credits_remaining="42")
    before = counts(dsn)
    summary, report = await run(tollhouse, write(tmp_path, render([row])))
    assert (summary.created, summary.failed) == (1, 0) and report == []
    added = {table: n - before[table] for table, n in counts(dsn).items()}
    assert added["user_emails"] == added["email_routes"] == 0
    assert added["users"] == added["user_identities"] == added["identity_routes"] == 1
    for table in ("user_roles", "user_email_preferences", "tenants", "tenant_members"):
        assert added[table] == 1, table
    assert added["credit_accounts"] == added["credit_ledger"] == added["import_users"] == 1
    user_id = uuid.UUID(row["user_id"])
    assert address_rows(dsn, user_id) == (0, 0, ["apple:a-ann:-"])
    assert (await tollhouse.users.find_by_identity("apple", "a-ann")) == (
        await tollhouse.users.get(user_id)
    )
    assert (await tollhouse.credits.balance(user_id=user_id)).balance == 42
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        assert await conservation_problems(conn) == []


async def test_a_record_without_an_email_merges_into_the_record_holding_its_id(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """Without an e-mail the provider id matches: the record of the file holding it (the
    first with an e-mail, else the first) is the user, and the others bring nothing."""
    rows = list(legacy_rows(5))
    apple(rows[0], "a-ann").update(credits_balance="10", credits_remaining="10")
    apple(rows[1], "a-ann").update(credits_balance="500", credits_remaining="500")
    apple(rows[2], "a-bob", "Bob@Example.com")
    apple(rows[3], "a-bob")
    apple(rows[4], "a-ann", "ann@example.com").update(credits_balance="7", credits_remaining="7")
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    assert (summary.created, summary.merged, summary.failed) == (2, 3, 0)
    assert summary.identities_linked == 0
    assert [(r[0], r[2], r[3], r[4]) for r in report if r[4] != "plan_override"] == [
        ("2", "provider_user_id", "a-ann", "duplicate_of_record:6"),
        ("3", "provider_user_id", "a-ann", "duplicate_of_record:6"),
        ("5", "provider_user_id", "a-bob", "duplicate_of_record:4"),
    ]
    assert "brings nothing" in next(r[5] for r in report if r[0] == "2")
    ann, bob = uuid.UUID(rows[4]["user_id"]), uuid.UUID(rows[2]["user_id"])
    assert address_rows(dsn, ann) == (1, 1, ["apple:a-ann:ann@example.com"])
    assert address_rows(dsn, bob) == (1, 1, ["apple:a-bob:bob@example.com"])
    assert (await tollhouse.credits.balance(user_id=ann)).balance == 7  # not 10 or 510
    for other in (rows[0], rows[1], rows[3]):
        with pytest.raises(Exception, match="no user"):
            await tollhouse.users.get(uuid.UUID(other["user_id"]))


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
async def test_records_with_and_without_an_email_of_one_id_end_alike_in_either_order(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path, order: tuple[int, int]
) -> None:
    """Apple gives the address on the first login only: a record with it and one without,
    of the same Apple id, are one user with that address, whichever comes first."""
    pair = list(legacy_rows(2))
    subject = "a-" + uuid.uuid4().hex[:8]
    apple(pair[0], subject, "first@example.com")
    apple(pair[1], subject)
    rows = [pair[i] for i in order]
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    assert (summary.created, summary.merged, summary.failed) == (1, 1, 0)
    holder = rows.index(pair[0]) + 2
    merged = [r for r in report if r[4].startswith("duplicate_of_record")]
    assert [(r[0], r[4]) for r in merged] == [
        (str(rows.index(pair[1]) + 2), f"duplicate_of_record:{holder}")
    ]
    user = uuid.UUID(pair[0]["user_id"])
    assert address_rows(dsn, user) == (1, 1, [f"apple:{subject}:first@example.com"])
    again, _ = await run(tollhouse, write(tmp_path, render(rows)))
    # The record without an e-mail brings nothing again: unchanged (C-11).
    assert (again.unchanged, again.merged, again.created) == (2, 0, 0)


async def test_a_record_without_an_email_is_not_merged_into_a_user_its_id_is_not(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """A user in the database holds the Apple id; the file's records with that id merge by
    e-mail into another user, which cannot take it. The one without an e-mail is the
    database user's, so it is skipped as existing_identity, not reported as merged into a
    user that does not hold the id."""
    holder = apple(next(legacy_rows(1)), "a-held", "holder@example.com")
    await run(tollhouse, write(tmp_path, render([holder])))
    rows = list(legacy_rows(4))[1:]
    rows[0].update(email="zed@example.com", auth_provider="email", provider_user_id="")
    apple(rows[1], "a-held", "zed@example.com")
    apple(rows[2], "a-held")
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    assert (summary.created, summary.merged, summary.skipped) == (1, 1, 1)
    found = {r[0]: (r[4], r[5]) for r in report if r[4] != "plan_override"}
    assert found["3"][0] == "duplicate_of_record:2" and "not linked" in found["3"][1]
    assert found["4"][0] == "existing_identity"
    owner = uuid.UUID(holder["user_id"])
    assert address_rows(dsn, owner) == (1, 1, ["apple:a-held:holder@example.com"])


async def test_an_address_as_a_provider_id_is_masked_in_the_report(
    tollhouse: Tollhouse, tmp_path: Path
) -> None:
    """The classification's report rows show a provider id as report.shown would: an
    address in it masked (C-10)."""
    rows = list(legacy_rows(2))
    for row in rows:
        apple(row, "ann.secret@example.com")
    _, report = await run(tollhouse, write(tmp_path, render(rows)))
    merged = [r for r in report if r[4] == "duplicate_of_record:2"]
    assert [(r[2], r[3]) for r in merged] == [("provider_user_id", "a***@example.com")]
    assert not any("ann.secret" in cell for r in report for cell in r)


async def test_a_record_without_an_email_whose_id_a_user_holds_already_is_that_user(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """A user of an earlier import holds the Apple id: a record without an e-mail and with
    that user's user_id updates it (its e-mail stays); with another user_id it is skipped
    as existing_identity, as a record whose e-mail a user holds already is existing_user."""
    row = apple(next(legacy_rows(1)), "a-ann", "ann@example.com")
    await run(tollhouse, write(tmp_path, render([row])))
    ann = uuid.UUID(row["user_id"])
    state = counts(dsn)

    other = apple(list(legacy_rows(2))[1], "a-ann")
    summary, report = await run(tollhouse, write(tmp_path, render([other]), "other.csv"))
    assert (summary.skipped, summary.created, summary.merged) == (1, 0, 0)
    assert [(r[0], r[2], r[3], r[4]) for r in report] == [
        ("2", "provider_user_id", "a-ann", "existing_identity")
    ]
    assert "no e-mail" in report[0][5]
    assert counts(dsn) == state

    apple(row, "a-ann").update(display_name="Ann without her address")
    summary, _ = await run(tollhouse, write(tmp_path, render([row]), "v2.csv"))
    assert (summary.updated, summary.created) == (1, 0)
    assert (await tollhouse.users.get(ann)).display_name == "Ann without her address"
    assert address_rows(dsn, ann) == (1, 1, ["apple:a-ann:ann@example.com"])
    assert counts(dsn) == state


async def test_only_google_and_apple_records_with_their_id_go_without_an_email(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    rows = list(legacy_rows(3))
    rows[0].update(auth_provider="email", provider_user_id="", email="")
    apple(rows[1], "")
    apple(rows[2], "a-ann")
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    assert (summary.created, summary.failed) == (1, 2)
    assert [(r[0], r[2], r[4]) for r in report] == [
        ("2", "email", "missing_value"),
        ("3", "provider_user_id", "missing_value"),
    ]
    with pytest.raises(Exception, match="no user"):
        await tollhouse.users.get(uuid.UUID(rows[0]["user_id"]))


async def test_records_without_an_email_rerun_unchanged_and_dry_run_alike(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    rows = list(legacy_rows(6))
    apple(rows[0], "a-ann")
    apple(rows[1], "a-ann")
    apple(rows[2], "a-bob", "bob@example.com")
    apple(rows[3], "a-bob")
    rows[4].update(auth_provider="google", provider_user_id="g-cat", email="")
    path = write(tmp_path, render(rows))
    before = counts(dsn)
    dry, dry_report = await run(tollhouse, path, dry_run=True)
    assert counts(dsn) == before
    first, report = await run(tollhouse, path)
    assert report == dry_report
    assert (first.created, first.merged) == (dry.created, dry.merged) == (4, 2)
    state = counts(dsn), checksum(dsn)
    second, again = await run(tollhouse, write(tmp_path, render(rows), "again.csv"))
    assert (second.created, second.updated, second.unchanged, second.merged) == (0, 0, 6, 0)
    assert second.identities_linked == 0
    assert (counts(dsn), checksum(dsn)) == state
    merged = [(r[0], r[2], r[4]) for r in report if r[4].startswith("duplicate_of")]
    assert merged == [(r[0], r[2], r[4]) for r in again if r[4].startswith("duplicate_of")]
    assert merged == [
        ("3", "provider_user_id", "duplicate_of_record:2"),
        ("5", "provider_user_id", "duplicate_of_record:4"),
    ]


async def test_repeated_user_id_and_shared_provider_id_fail_the_later_record(
    tollhouse: Tollhouse, tmp_path: Path
) -> None:
    rows = list(legacy_rows(4))
    rows[2]["user_id"] = rows[0]["user_id"]
    rows[3].update(auth_provider="google", provider_user_id="shared")
    rows[1].update(auth_provider="google", provider_user_id="shared")
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    assert (summary.created, summary.failed) == (2, 2)
    assert [(r[0], r[2], r[4]) for r in report if r[4].startswith("duplicate")] == [
        ("4", "user_id", "duplicate_user_id"),
        ("5", "provider_user_id", "duplicate_provider_user_id"),
    ]


async def test_c06_a_user_id_is_held_by_its_first_record_even_one_that_failed(
    tollhouse: Tollhouse, tmp_path: Path
) -> None:
    """The second occurrence of an id is the error, whatever became of the first (the later
    record was imported, and on a rerun with the first record fixed it would have been
    this one that failed). A ragged record's fields may be shifted: it holds no id."""
    rows = list(legacy_rows(6))
    rows[0]["email"] = "not an address"
    rows[2]["user_id"] = rows[0]["user_id"].upper()
    rows[3]["user_id"] = rows[1]["user_id"]
    rows[4]["user_id"] = rows[1]["user_id"]
    lines = render(rows).split("\r\n")
    lines[2] += ",extra"  # record 3 (rows[1]) is ragged
    summary, report = await run(tollhouse, write(tmp_path, "\r\n".join(lines)))
    assert (summary.created, summary.failed) == (2, 4)
    assert [(r[0], r[4], r[5]) for r in report if r[2] in ("user_id", "email", "")] == [
        ("2", "invalid_email", "not a valid e-mail address"),
        ("3", "wrong_field_count", "20 fields where the header has 19"),
        ("4", "duplicate_user_id", "user_id already on record 2; record not imported"),
        ("6", "duplicate_user_id", "user_id already on record 5; record not imported"),
    ]
    assert await tollhouse.users.find_by_email(rows[2]["email"]) is None


async def test_c09_accepted_credits_are_import_grants_that_conserve(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    rows = list(legacy_rows(30))
    rows[0]["credits_balance"] = "-50"
    rows[1]["credits_balance"] = "0"
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    assert summary.failed == 1 and ("2", "credits_balance", "negative_credits") in [
        (r[0], r[2], r[4]) for r in report
    ]
    with psycopg.connect(dsn) as conn:
        ledger = conn.execute(
            "SELECT count(*), sum(delta) FROM tollhouse.credit_ledger WHERE reason = 'grant.import'"
        ).fetchone()
        accounts = conn.execute("SELECT count(*) FROM tollhouse.credit_accounts").fetchone()
    positive = [int(r["credits_balance"]) for r in rows[2:] if int(r["credits_balance"]) > 0]
    assert ledger == (len(positive), sum(positive))
    assert accounts == (29,)  # the zero balance has an account, and no grant
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        assert await conservation_problems(conn) == []
    # The accounts work as any other: a debit takes from the imported grant.
    payer = uuid.UUID(rows[2]["user_id"])
    before = (await tollhouse.credits.balance(user_id=payer)).balance
    if before > 0:
        result = await tollhouse.credits.debit(DebitRequest(1, "turn-1", user_id=payer))
        assert result.status == "applied" and result.balance_after == before - 1


async def test_c10_report_schema_sums_and_a_byte_identical_dry_run(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    rows = list(legacy_rows(60))
    rows[3]["email"] = "not an email"
    rows[5]["created_at"] = "31/12/2020"
    rows[9]["email"] = rows[8]["email"]
    rows[11]["plan_tier"] = "platinum"
    text = render(rows, [*reversed(list(rows[0])), "legacy_notes"])
    path = write(tmp_path, text)
    before = counts(dsn)
    dry = tmp_path / "dry.csv"
    real = tmp_path / "real.csv"
    dry_summary = await tollhouse.imports.import_users(path, dry_run=True, report=dry)
    assert counts(dsn) == before  # nothing written
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM tollhouse.import_runs").fetchone() == (0,)
    real_summary = await tollhouse.imports.import_users(path, report=real)
    assert dry.read_bytes() == real.read_bytes()
    for field in ("records_read", "created", "merged", "failed", "skipped", "warnings"):
        assert getattr(dry_summary, field) == getattr(real_summary, field), field
    assert total(real_summary) == real_summary.records_read == 60
    assert (real_summary.failed, real_summary.merged) == (3, 1)

    report = list(csv.DictReader(io.StringIO(real.read_text())))
    assert list(report[0]) == REPORT_HEADER.split(",")
    failed_records = {
        r["record_no"]
        for r in report
        if r["code"] in {"invalid_email", "ambiguous_date", "unknown_plan"}
    }
    assert failed_records == {"5", "7", "13"}
    assert report[0]["record_no"] == "1" and report[0]["code"] == "unknown_column"
    for r in report:
        assert int(r["line_no"]) >= 1 and r["code"] and r["message"]
        assert len(r["value"]) <= 65  # 64, plus a leading quote when neutralised
        assert "@" not in r["value"] or "***@" in r["value"]


async def test_c11_a_second_run_changes_nothing(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    path = write_legacy_csv(tmp_path / "users.csv", 2000)
    first = await tollhouse.imports.import_users(path, batch_size=300)
    state = counts(dsn), checksum(dsn)
    second = await tollhouse.imports.import_users(path, batch_size=300)
    assert first.created == 2000
    assert (second.created, second.updated, second.unchanged) == (0, 0, 2000)
    assert (counts(dsn), checksum(dsn)) == state  # no new rows, no new ledger entries
    assert duplicate_keys(dsn) == 0


async def test_a_changed_record_updates_its_user_but_not_its_balance(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    rows = list(legacy_rows(5))
    await run(tollhouse, write(tmp_path, render(rows)))
    ledger = counts(dsn)["credit_ledger"]
    rows[2].update(display_name="Renamed", newsletter_opt_in="false", credits_balance="7")
    rows[2].update(credits_remaining="7", last_login_at="2025-02-03T04:05:06Z")
    summary, report = await run(tollhouse, write(tmp_path, render(rows), "v2.csv"))
    assert (summary.updated, summary.unchanged) == (1, 4)
    user_id = uuid.UUID(rows[2]["user_id"])
    user = await tollhouse.users.get(user_id)
    assert user.display_name == "Renamed"
    assert user.last_seen_at == datetime(2025, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert not (await tollhouse.users.preferences(user_id)).marketing
    assert counts(dsn)["credit_ledger"] == ledger
    assert ("4", "balance_not_reimported") in [(r[0], r[4]) for r in report]


async def test_a_record_with_several_classification_notes_reports_each_once(
    tollhouse: Tollhouse, tmp_path: Path
) -> None:
    """An updated record whose balance changed and whose customer another record owns has
    two classification notes: each is its own report row (they shared a key and the whole
    import failed)."""
    rows = list(legacy_rows(2))
    for row in rows:
        row.update(
            plan_tier="pro",
            stripe_customer_id="cus_same",
            stripe_subscription_id="",
            billing_status="",
        )
    await run(tollhouse, write(tmp_path, render(rows)))
    rows[1].update(display_name="Renamed", credits_balance="1", credits_remaining="1")
    summary, report = await run(tollhouse, write(tmp_path, render(rows), "v2.csv"))
    assert (summary.updated, summary.unchanged) == (1, 1)
    assert [(r[0], r[4]) for r in report if r[0] == "3"] == [
        ("3", "plan_override"),
        ("3", "balance_not_reimported"),
        ("3", "customer_linked_elsewhere"),
    ]


async def test_a_user_this_import_did_not_create_is_never_touched(
    tollhouse: Tollhouse, tmp_path: Path
) -> None:
    other = await tollhouse.users.create(email="someone@else.com", display_name="Mine")
    row = next(legacy_rows(1))
    row["user_id"] = str(other.id)
    summary, report = await run(tollhouse, write(tmp_path, render([row])))
    assert summary.skipped == 1 and [r[4] for r in report] == ["existing_user"]
    assert (await tollhouse.users.get(other.id)).display_name == "Mine"


async def test_c01_an_invalid_byte_in_a_user_id_or_a_ragged_row_fails_only_its_record(
    tollhouse: Tollhouse, tmp_path: Path
) -> None:
    """The byte reaches the report's value (it crashed the import writing the issues)."""
    # Two undecodable records (the ragged one counts too) in 2,001: still record errors.
    rows = list(legacy_rows(2001))
    rows[0]["user_id"] = "BAD"
    rows[1]["auth_provider"] = "BAD"
    lines = render(rows).split("\r\n")
    lines[2] += ",extra"
    path = write(tmp_path, "\r\n".join(lines).encode().replace(b"BAD", b"\xff"))
    summary, report = await run(tollhouse, path)
    assert (summary.created, summary.failed) == (1999, 2)
    errors = [(r[0], r[3][:8], r[4]) for r in report if r[4] != "plan_override"]
    assert errors == [
        ("2", "\\xff,U**", "invalid_encoding"),
        ("3", rows[1]["user_id"][:8], "wrong_field_count"),
    ]
    assert "\\xff" in next(r[3] for r in report if r[0] == "3")


async def test_c14_unknown_column_names_are_shown_like_values(
    tollhouse: Tollhouse, tmp_path: Path
) -> None:
    """A NUL in an unknown column's name failed the COPY of the issues; an address there was
    neither masked nor cut."""
    address = "secret.person@example.com " + "y" * 200
    lines = render(list(legacy_rows(2))).split("\r\n")
    lines = [lines[0] + ",x\x00y," + address] + [line + ",a,b" for line in lines[1:-1]] + [""]
    summary, report = await run(tollhouse, write(tmp_path, "\r\n".join(lines)))
    assert summary.created == 2
    unknown = [(r[0], r[2], r[3], r[4]) for r in report if r[4] == "unknown_column"]
    assert unknown[0] == ("1", "x\\0y", "x\\0y", "unknown_column")
    assert unknown[1][1] == unknown[1][2] == "s***@example.com " + "y" * 46 + "…"
    assert not any("secret" in cell or "\x00" in cell for row in report for cell in row)


async def test_c01_a_latin1_file_is_refused_and_reads_with_its_encoding(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    rows = list(legacy_rows(20))
    for row in rows[::2]:
        row["display_name"] = "Zoë Müller"
    path = write(tmp_path, render(rows).encode("latin-1"))
    before = counts(dsn)
    with pytest.raises(ImportFileRejected, match="not valid UTF-8") as info:
        await tollhouse.imports.import_users(path)
    assert info.value.fields["reason"] == "wrong_encoding"
    assert counts(dsn) == before
    summary = await tollhouse.imports.import_users(path, encoding="latin-1")
    assert summary.created == 20
    user = await tollhouse.users.get(uuid.UUID(rows[0]["user_id"]))
    assert user.display_name == "Zoë Müller"


async def test_bad_options_are_refused_before_reading(tollhouse: Tollhouse, tmp_path: Path) -> None:
    path = write(tmp_path, render(list(legacy_rows(1))))
    with pytest.raises(InvalidRequest, match="no plan"):
        await tollhouse.imports.import_users(path, plan_map=["enterprise=business"])
    with pytest.raises(InvalidRequest, match="batch-size"):
        await tollhouse.imports.import_users(path, batch_size=0)
    with pytest.raises(InvalidRequest, match="no file"):
        await tollhouse.imports.import_users(tmp_path / "missing.csv")


async def test_a_changed_tier_moves_the_account_like_any_plan_change(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    row = next(legacy_rows(1))
    row.update(
        plan_tier="pro",
        stripe_customer_id="cus_9",
        stripe_subscription_id="sub_9",
        billing_status="active",
        credits_balance="40",
        credits_remaining="40",
    )
    first, _ = await run(tollhouse, write(tmp_path, render([row])))
    assert first.created == 1 and first.billing_subscriptions == 1
    user_id = uuid.UUID(row["user_id"])
    user = await tollhouse.users.get(user_id)
    assert user.plan_override is None  # a subscriber: the billing step gives the plan
    assert (await tollhouse.credits.balance(user_id=user_id)).plan == "pro"
    row.update(plan_tier="starter")
    second, _ = await run(tollhouse, write(tmp_path, render([row]), "v2.csv"))
    assert second.updated == 1
    balance = await tollhouse.credits.balance(user_id=user_id)
    assert balance.plan == "starter"
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        assert await conservation_problems(conn) == []


async def test_stripe_ids_become_the_billing_customer_and_subscription(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """The billing step: customer and route for the personal tenant, the subscription as a
    state older than any Stripe event, the account on its effective plan (a canceled legacy
    subscription leaves the free plan); a customer already routed elsewhere stays there."""
    rows = list(legacy_rows(3))
    rows[0].update(
        plan_tier="pro",
        stripe_customer_id="cus_a",
        stripe_subscription_id="sub_a",
        billing_status="active",
    )
    rows[1].update(
        plan_tier="pro",
        stripe_customer_id="cus_b",
        stripe_subscription_id="sub_b",
        billing_status="canceled",
    )
    rows[2].update(
        plan_tier="starter",
        stripe_customer_id="cus_a",
        stripe_subscription_id="",
        billing_status="",
    )
    summary, report = await run(tollhouse, write(tmp_path, render(rows)))
    assert (summary.billing_customers, summary.billing_subscriptions) == (2, 2)
    linked = [r for r in report if r[4] == "customer_linked_elsewhere"]
    assert [(r[0], r[2], r[3]) for r in linked] == [("4", "stripe_customer_id", "cus_a")]
    assert "record 2" in linked[0][5]
    ids = [uuid.UUID(r["user_id"]) for r in rows]
    billing = [
        await tollhouse.billing.summary(await tollhouse.billing.personal_tenant(u)) for u in ids
    ]
    assert [b.customer_id for b in billing] == ["cus_a", "cus_b", None]
    assert billing[0].subscription is not None and billing[0].subscription.status == "active"
    assert [b.plan for b in billing] == ["pro", "free", "starter"]
    plans = [(await tollhouse.credits.balance(user_id=u)).plan for u in ids]
    assert plans == ["pro", "free", "starter"]
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT stripe_at FROM tollhouse.subscriptions WHERE id = 'sub_a'")
        assert (await cur.fetchone()) is not None
        assert await conservation_problems(conn) == []
    again, _ = await run(tollhouse, write(tmp_path, render(rows), "again.csv"))
    assert (again.billing_customers, again.billing_subscriptions) == (0, 0)


async def test_a_customer_routed_to_another_tenant_is_reported_dry_run_included(
    tollhouse: Tollhouse, dsn: str, tmp_path: Path
) -> None:
    """A Stripe customer that belongs to another account keeps it; the record is imported
    without its billing rows and the report says so (warning customer_linked_elsewhere),
    in the dry run too."""
    other = await tollhouse.users.create(email="owner@else.com")
    tenant = await tollhouse.billing.personal_tenant(other.id)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            "INSERT INTO tollhouse.billing_customer_routes (customer_id, tenant_id)"
            " VALUES ('cus_taken', %s)",
            [tenant],
        )
    rows = list(legacy_rows(2))
    rows[1].update(
        plan_tier="pro",
        stripe_customer_id="cus_taken",
        stripe_subscription_id="sub_taken",
        billing_status="active",
    )
    path = write(tmp_path, render(rows))
    dry, dry_report = await run(tollhouse, path, dry_run=True)
    summary, report = await run(tollhouse, path)
    assert dry_report == report
    assert [(r[0], r[3], r[4]) for r in report if r[2] == "stripe_customer_id"] == [
        ("3", "cus_taken", "customer_linked_elsewhere")
    ]
    assert summary.created == 2 and summary.warnings == dry.warnings
    assert (summary.billing_customers, summary.billing_subscriptions) == (0, 0)
    user = uuid.UUID(rows[1]["user_id"])
    assert (
        await tollhouse.billing.summary(await tollhouse.billing.personal_tenant(user))
    ).customer_id is None
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT tenant_id FROM tollhouse.billing_customer_routes"
            " WHERE customer_id = 'cus_taken'"
        )
        assert await cur.fetchall() == [(tenant,)]
