"""The legacy CSV reader and validator (RELIABILITY 7.3, the file-level and field-level
parts of C-01..C-09, C-13, C-14): generated fixtures, no database."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.legacy_csv import legacy_rows, render
from tollhouse.errors import ImportFileRejected
from tollhouse.imports.feed import copy_line, issue_line
from tollhouse.imports.parse import COLUMNS, FIELD_LIMIT, CsvFile, Header, RawRecord
from tollhouse.imports.report import Issue, neutralise, shown, write_report
from tollhouse.imports.validate import PLAN_MAP_V1, DateRules, Staged, Validator, parse_plan_map

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def read(path: Path, encoding: str | None = None) -> tuple[Header, list[RawRecord]]:
    items = list(CsvFile(path, encoding).records())
    header = items[0]
    assert isinstance(header, Header)
    return header, [r for r in items[1:] if isinstance(r, RawRecord)]


def write(tmp_path: Path, data: str | bytes, name: str = "users.csv") -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_bytes(data.encode("utf-8"))
    else:
        path.write_bytes(data)
    return path


def checked(
    rows: Sequence[dict[str, str]], tmp_path: Path, plan_map: dict[str, str] | None = None
) -> list[tuple[Staged | None, list[Issue]]]:
    header, records = read(write(tmp_path, render(rows)))
    validator = Validator(header, plan_map or dict(PLAN_MAP_V1), NOW)
    return [validator.check(r) for r in records]


def codes(result: tuple[Staged | None, list[Issue]]) -> list[tuple[str, str]]:
    return [(i.column, i.code) for i in result[1]]


SUBSCRIBED = {
    "stripe_customer_id": "cus_1",
    "stripe_subscription_id": "sub_1",
    "billing_status": "active",
}


def base_row(**changes: str) -> dict[str, str]:
    row = next(legacy_rows(1))
    row.update(changes)
    return row


# --- C-01 encodings ---------------------------------------------------------------------------


def test_c01_a_bom_file_parses_exactly_like_one_without(tmp_path: Path) -> None:
    text = render(list(legacy_rows(20)))
    plain = read(write(tmp_path, text, "plain.csv"))
    bom = read(write(tmp_path, b"\xef\xbb\xbf" + text.encode(), "bom.csv"))
    assert bom[0].positions == plain[0].positions
    assert [r.fields for r in bom[1]] == [r.fields for r in plain[1]]
    assert len(plain[1]) == 20


def test_c01_utf16_is_refused_naming_the_encoding_unless_asked_for(tmp_path: Path) -> None:
    text = render(list(legacy_rows(3)))
    path = write(tmp_path, text.encode("utf-16"), "u16.csv")  # with its BOM
    with pytest.raises(ImportFileRejected, match="UTF-16LE") as info:
        CsvFile(path)
    assert info.value.fields["reason"] == "wrong_encoding"
    no_bom = write(tmp_path, text.encode("utf-16-le"), "u16nobom.csv")
    with pytest.raises(ImportFileRejected, match="UTF-16"):
        CsvFile(no_bom)
    _, records = read(path, "utf-16")
    assert [r.fields[1] for r in records] == [r["email"] for r in legacy_rows(3)]


def test_c01_one_invalid_byte_fails_only_its_record(tmp_path: Path) -> None:
    rows = list(legacy_rows(6000))
    rows[4998]["display_name"] = "INVALID"  # record 5,000 (the header is record 1)
    data = render(rows).encode().replace(b"INVALID", b"bad \xff byte")
    csv_file = CsvFile(write(tmp_path, data))
    items = [r for r in csv_file.records() if isinstance(r, RawRecord)]
    bad = [r for r in items if r.error]
    assert [(r.record_no, r.error[0] if r.error else "") for r in bad] == [
        (5000, "invalid_encoding")
    ]
    assert len(items) == 6000 and csv_file.undecodable_records == 1


def test_c01_an_invalid_byte_anywhere_in_a_record_is_reported_as_utf8_text(
    tmp_path: Path,
) -> None:
    """Near the start of a record (user_id, e-mail) or in a ragged row, the invalid byte
    reaches the report's value: it is shown escaped, never as the surrogate that cannot be
    written as UTF-8."""
    rows = list(legacy_rows(4))
    rows[0]["user_id"] = "BAD1"
    rows[1]["email"] = "BAD2@example.com"
    rows[2]["auth_provider"] = "BAD3"
    lines = render(rows).split("\r\n")
    lines[3] += ",extra"  # record 4 is ragged too
    data = "\r\n".join(lines).encode()
    for marker in (b"BAD1", b"BAD2", b"BAD3"):
        data = data.replace(marker, b"x\xff" + marker)
    header, records = read(write(tmp_path, data))
    validator = Validator(header, dict(PLAN_MAP_V1), NOW)
    found = [issue for r in records for issue in validator.check(r)[1]]
    issues = [i for i in found if i.code != "plan_override"]
    assert [(i.record_no, i.code) for i in issues] == [
        (2, "invalid_encoding"),
        (3, "invalid_encoding"),
        (4, "wrong_field_count"),
    ]
    for issue in found:
        issue_line(issue, 0).encode("utf-8")  # raised UnicodeEncodeError
    assert issues[0].value.startswith("x\\xffBAD1,U***@Example0.com,google")
    assert ",x***@example" in issues[1].value
    assert ",x\\xffBAD" in issues[2].value


def test_c01_bad_bytes_in_ragged_and_unclosed_records_count_towards_the_refusal(
    tmp_path: Path,
) -> None:
    """The 1-in-1,000 refusal counts every record with bytes that are not UTF-8, whatever
    else is wrong with it: a ragged row, the first line of a quote left open that closes on
    a later record's line, or of one never closed."""
    rows = list(legacy_rows(7))
    for i, name in enumerate(("BAD1", "BAD2", "BAD3", "", "", "BAD4")):
        rows[i]["display_name"] = name or "Fine"
    rows[3]["billing_status"] = "x"
    lines = render(rows).split("\r\n")
    lines[2] += ",extra"  # record 3 is ragged
    lines[3] = lines[3].replace(",BAD3,", ',"BAD3,')  # record 4's quote ends on record 5's line
    lines[4] += '"'
    lines[6] = lines[6].replace("BAD4", '"BAD4 open')  # record 7: a quote never closed
    data = "\r\n".join(lines).encode()
    for marker in (b"BAD1", b"BAD2", b"BAD3", b"BAD4"):
        data = data.replace(marker, b"x\xff" + marker)
    csv_file = CsvFile(write(tmp_path, data))
    records = [r for r in csv_file.records() if isinstance(r, RawRecord)]
    assert [(r.record_no, r.error[0] if r.error else "") for r in records][:6] == [
        (2, "invalid_encoding"),
        (3, "wrong_field_count"),
        (4, "malformed_csv"),
        (5, ""),
        (6, ""),
        (7, "malformed_csv"),
    ]
    assert csv_file.undecodable_records == 4


def test_c01_latin1_reads_with_an_explicit_encoding(tmp_path: Path) -> None:
    rows = list(legacy_rows(3))
    rows[1]["display_name"] = "José"
    path = write(tmp_path, render(rows).encode("latin-1"))
    _, records = read(path, "latin-1")
    assert records[1].fields[COLUMNS.index("display_name")] == "José"
    assert all(r.error is None for r in records)


# --- C-02 line endings and embedded newlines -----------------------------------------------


def test_c02_crlf_lf_and_mixed_give_the_same_records(tmp_path: Path) -> None:
    rows = list(legacy_rows(10))
    rows[3]["display_name"] = "two\r\nlines"
    rows[6]["display_name"] = "also\ntwo"
    crlf = render(rows, newline="\r\n")
    lf = render(rows, newline="\n")
    mixed = "".join(
        line + ("\r\n" if i % 2 else "\n") for i, line in enumerate(lf.split("\n")[:-1])
    )
    parsed = [read(write(tmp_path, text, f"{n}.csv"))[1] for n, text in enumerate([crlf, lf])]
    parsed.append(read(write(tmp_path, mixed, "mixed.csv"))[1])
    for records in parsed:
        assert len(records) == 10
        assert all(r.error is None for r in records)
    assert [r.fields for r in parsed[0]] == [r.fields for r in parsed[2]]
    first = parsed[0]
    assert first[3].fields[COLUMNS.index("display_name")] == "two\r\nlines"
    assert first[6].fields[COLUMNS.index("display_name")] == "also\ntwo"
    # Records 2..5 start on lines 2..5; record 5 (rows[3]) spans two lines, so record 6
    # starts on line 7 and the one after the second embedded newline on line 10.
    assert [(r.record_no, r.line_no) for r in first[3:8]] == [
        (5, 5),
        (6, 7),
        (7, 8),
        (8, 9),
        (9, 11),
    ]


# --- C-03 quotes and ragged rows ---------------------------------------------------------------


def test_c03_doubled_quotes_are_decoded(tmp_path: Path) -> None:
    row = base_row(display_name='b"bb')
    text = render([row])
    assert '"b""bb"' in text
    _, records = read(write(tmp_path, text))
    assert records[0].fields[COLUMNS.index("display_name")] == 'b"bb'


def test_c03_an_unterminated_quote_fails_its_record_and_eats_no_other(tmp_path: Path) -> None:
    rows = list(legacy_rows(1000))
    lines = render(rows).split("\r\n")
    # Record 700 is line 700 (no embedded newlines): open a quote that never closes.
    lines[699] = lines[699].replace(",User", ',"User', 1)
    _, records = read(write(tmp_path, "\r\n".join(lines)))
    assert len(records) == 1000  # every record detected: sum of outcomes = records
    bad = [(r.record_no, r.line_no, r.error[0]) for r in records if r.error]
    assert bad == [(700, 700, "malformed_csv")]
    assert [r.record_no for r in records] == list(range(2, 1002))
    assert records[-1].fields[1] == rows[-1]["email"]


def test_c03_ragged_rows_are_record_errors(tmp_path: Path) -> None:
    text = render(list(legacy_rows(3)))
    lines = text.split("\r\n")
    lines[1] += ",extra"
    lines[2] = lines[2].rsplit(",", 2)[0]
    _, records = read(write(tmp_path, "\r\n".join(lines)))
    assert [(r.record_no, r.error[0] if r.error else None) for r in records] == [
        (2, "wrong_field_count"),
        (3, "wrong_field_count"),
        (4, None),
    ]


def test_c03_a_ragged_record_over_two_lines_is_one_record(tmp_path: Path) -> None:
    """A quoted line break in a record of the wrong width: one wrong_field_count, and the
    records after it keep their numbers (its second line was read again as a record)."""
    rows = list(legacy_rows(4))
    rows[1]["display_name"] = "two\nlines"
    lines = render(rows, newline="\n").split("\n")
    lines[3] += ",extra"  # the second line of record 3
    _, records = read(write(tmp_path, "\n".join(lines)))
    assert [(r.record_no, r.line_no, r.error[0] if r.error else None) for r in records] == [
        (2, 2, None),
        (3, 3, "wrong_field_count"),
        (4, 5, None),
        (5, 6, None),
    ]
    assert records[1].fields[COLUMNS.index("display_name")] == "two\nlines"


def test_c03_a_quote_left_open_that_closes_on_a_later_line_eats_no_record(
    tmp_path: Path,
) -> None:
    """The open quote of record 3 ends at a quote that ends record 4's line: record 3 is
    malformed on its first line, and record 4 is read again on its own."""
    rows = list(legacy_rows(4))
    rows[1]["display_name"] = "Open"
    rows[2]["billing_status"] = "x"
    lines = render(rows).split("\r\n")
    lines[2] = lines[2].replace(",Open,", ',"Open,')
    lines[3] += '"'
    _, records = read(write(tmp_path, "\r\n".join(lines)))
    assert [(r.record_no, r.line_no, r.error[0] if r.error else None) for r in records] == [
        (2, 2, None),
        (3, 3, "malformed_csv"),
        (4, 4, None),
        (5, 5, None),
    ]
    assert records[2].fields[COLUMNS.index("billing_status")] == 'x"'


def test_c03_a_quote_left_open_that_closes_in_the_next_records_line_break_eats_no_record(
    tmp_path: Path,
) -> None:
    """Record 3's open quote ends at the quote that opens record 4's display name, which
    starts with a line break: record 4 is whole only across its two lines, and is read again
    as itself (not taken into record 3 as one ragged record, its second line a phantom)."""
    rows = list(legacy_rows(5))
    rows[1]["display_name"] = "Open"
    rows[2]["display_name"] = "\nBob"
    lines = render(rows, newline="\n").split("\n")
    lines[2] = lines[2].replace(",Open,", ',"Open,')
    _, records = read(write(tmp_path, "\n".join(lines)))
    assert [(r.record_no, r.line_no, r.error[0] if r.error else None) for r in records] == [
        (2, 2, None),
        (3, 3, "malformed_csv"),
        (4, 4, None),
        (5, 6, None),
        (6, 7, None),
    ]
    assert records[2].fields[COLUMNS.index("display_name")] == "\nBob"
    assert records[2].fields[COLUMNS.index("user_id")] == rows[2]["user_id"]


# --- C-04 header ---------------------------------------------------------------------------------


def test_c04_missing_or_duplicate_required_column_refuses_the_file(tmp_path: Path) -> None:
    rows = list(legacy_rows(2))
    without = [c for c in COLUMNS if c != "email"]
    with pytest.raises(ImportFileRejected, match="email") as info:
        read(write(tmp_path, render(rows, without)))
    assert info.value.fields["reason"] == "missing_column"
    with pytest.raises(ImportFileRejected, match="twice") as info:
        read(write(tmp_path, render(rows, [*COLUMNS, "email"])))
    assert info.value.fields["reason"] == "duplicate_column"


def test_c04_unknown_column_warns_and_any_order_is_accepted(tmp_path: Path) -> None:
    rows = list(legacy_rows(5))
    shuffled = [*reversed(COLUMNS), "favourite_colour"]
    header, records = read(write(tmp_path, render(rows, shuffled)))
    assert [(i.column, i.code) for i in header.issues] == [("favourite_colour", "unknown_column")]
    normal = checked(rows, tmp_path)
    validator = Validator(header, dict(PLAN_MAP_V1), NOW)
    assert [validator.check(r)[0] for r in records] == [staged for staged, _ in normal]


# --- C-06..C-09 fields ---------------------------------------------------------------------


def test_c06_user_ids(tmp_path: Path) -> None:
    uid = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"
    results = checked(
        [
            base_row(user_id=uid),
            base_row(user_id=uid.upper()),
            base_row(user_id="{" + uid + "}"),
            base_row(user_id="not-a-uuid"),
            base_row(user_id=""),
        ],
        tmp_path,
    )
    assert [r[0][2] if r[0] else None for r in results[:3]] == [uid, uid, uid]
    assert codes(results[3]) == [("user_id", "invalid_uuid")]
    assert codes(results[4]) == [("user_id", "missing_value")]


def test_c07_dates(tmp_path: Path) -> None:
    values = [
        "2021-03-04",
        "2021-03-04T10:00:00Z",
        "2021-03-04T10:00:00",
        "03/04/2021",
        "1614816000",
        "2021-02-30",
        "2031-01-01",
    ]
    results = checked([base_row(created_at=v) for v in values], tmp_path)
    staged = [
        datetime.fromisoformat(r[0][7]).isoformat() if r[0] and r[0][7] else None for r in results
    ]
    assert staged[:3] == [
        "2021-03-04T00:00:00+00:00",
        "2021-03-04T10:00:00+00:00",
        "2021-03-04T10:00:00+00:00",  # naive = UTC
    ]
    assert [codes(r) for r in results[3:]] == [
        [("created_at", "ambiguous_date")],
        [("created_at", "invalid_date")],
        [("created_at", "invalid_date")],
        [("created_at", "future_date")],
    ]


def created_at(tmp_path: Path, rules: DateRules, *values: str) -> list[str | list[str]]:
    """Each value as created_at under `rules`: the UTC time staged, or the error codes."""
    header, records = read(write(tmp_path, render([base_row(created_at=v) for v in values])))
    validator = Validator(header, dict(PLAN_MAP_V1), NOW, dates=rules)
    out: list[str | list[str]] = []
    for record in records:
        staged, issues = validator.check(record)
        if staged is None or staged[7] is None:
            out.append([i.code for i in issues])
        else:
            out.append(datetime.fromisoformat(staged[7]).astimezone(UTC).isoformat())
    return out


def test_c07_declared_day_or_month_first(tmp_path: Path) -> None:
    values = ("03/04/2021", "03/04/2021 10:30", "31/12/2020", "12/31/2020", "03/04/21")
    assert created_at(tmp_path, DateRules("dmy"), *values) == [
        "2021-04-03T00:00:00+00:00",
        "2021-04-03T10:30:00+00:00",
        "2020-12-31T00:00:00+00:00",
        ["invalid_date"],  # no month 31
        ["invalid_date"],  # a two-digit year stays ambiguous
    ]
    assert created_at(tmp_path, DateRules("mdy"), *values) == [
        "2021-03-04T00:00:00+00:00",
        "2021-03-04T10:30:00+00:00",
        ["invalid_date"],
        "2020-12-31T00:00:00+00:00",
        ["invalid_date"],
    ]
    assert created_at(tmp_path, DateRules(), "03/04/2021 10:30") == [["ambiguous_date"]]


def test_c07_epoch_seconds_only_when_declared(tmp_path: Path) -> None:
    assert created_at(tmp_path, DateRules(), "1614816000") == [["invalid_date"]]
    assert created_at(tmp_path, DateRules(epoch=True), "1614816000", "03/04/2021") == [
        "2021-03-04T00:00:00+00:00",
        ["ambiguous_date"],
    ]
    assert created_at(tmp_path, DateRules(epoch=True), "99999999999") == [["future_date"]]


def test_c07_naive_times_are_in_the_declared_zone(tmp_path: Path) -> None:
    paris = DateRules("dmy", time_zone="Europe/Paris")
    assert created_at(
        tmp_path,
        paris,
        "2021-03-04T10:00:00",
        "2021-03-04",
        "2021-03-04T10:00:00Z",
        "2021-07-04T10:00:00",
        "04/07/2021 10:00",
        "2021-03-28T02:30:00",  # the clocks jumped from 2:00 to 3:00 that night
    ) == [
        "2021-03-04T09:00:00+00:00",
        "2021-03-03T23:00:00+00:00",
        "2021-03-04T10:00:00+00:00",  # an offset wins over the zone
        "2021-07-04T08:00:00+00:00",
        "2021-07-04T08:00:00+00:00",
        ["invalid_date"],
    ]
    with pytest.raises(ValueError, match="date-format"):
        DateRules("ymd")
    with pytest.raises(ValueError, match="time zone"):
        DateRules(time_zone="Mars/Olympus_Mons")


def test_c08_plan_tiers(tmp_path: Path) -> None:
    rows = [
        base_row(plan_tier="enterprise", **SUBSCRIBED),
        base_row(plan_tier="Pro", **SUBSCRIBED),
        base_row(plan_tier=""),
        base_row(plan_tier="platinum"),
    ]
    default = checked(rows, tmp_path)
    assert [r[0][10] if r[0] else None for r in default[:2]] == ["power", "pro"]
    assert codes(default[2]) == [("plan_tier", "missing_value")]
    assert codes(default[3]) == [("plan_tier", "unknown_plan")]
    assert "unknown_plan:platinum" in default[3][1][0].message
    mapping = parse_plan_map(["enterprise=pro", "=free", "platinum=power"])
    mapped = checked(rows, tmp_path, mapping)
    assert [r[0][10] if r[0] else None for r in mapped] == ["pro", "pro", "free", "power"]
    with pytest.raises(ValueError, match="no plan"):
        parse_plan_map(["enterprise=business"], frozenset({"free", "pro"}))


def test_c10_messages_never_repeat_a_raw_value(tmp_path: Path) -> None:
    """The value cell masks addresses and cuts at 64 characters; a message that repeated the
    value undid both."""
    secret = "alice.secret@example.com" + "q" * 300
    rows = [
        base_row(created_at=secret),
        base_row(last_login_at="2099-01-01T00:00:00Z " + secret),
        base_row(credits_last_reset="03/04/2021 " + secret),
        base_row(plan_tier="bob.secret@example.com"),
    ]
    results = checked(rows, tmp_path)
    assert [codes(r) for r in results] == [
        [("created_at", "invalid_date")],
        [("last_login_at", "invalid_date")],
        [("credits_last_reset", "ambiguous_date")],
        [("plan_tier", "unknown_plan")],
    ]
    for _, issues in results:
        for issue in issues:
            assert "secret" not in issue.message and "qqqq" not in issue.message, issue
    assert results[3][1][0].message.startswith("unknown_plan:b***@example.com ")
    future = checked([base_row(created_at="2031-01-01"), base_row(created_at="3/4/21")], tmp_path)
    assert [(i.code, i.message) for _, issues in future for i in issues] == [
        ("future_date", "a date in the future"),
        ("ambiguous_date", "could be dd/mm or mm/dd; use ISO 8601 or declare --date-format"),
    ]


def test_c08_a_paid_tier_without_subscription_becomes_plan_override(tmp_path: Path) -> None:
    (result,) = checked([base_row(plan_tier="starter")], tmp_path)
    assert result[0] is not None and result[0][11] == "starter"
    assert codes(result) == [("plan_tier", "plan_override")]
    assert result[1][0].severity == "warning"


def test_c09_credits(tmp_path: Path) -> None:
    values = ["-50", "1.5", "1e3", "99999999999999999999", "", "abc", "42"]
    results = checked([base_row(credits_balance=v, credits_remaining="") for v in values], tmp_path)
    assert [codes(r) for r in results[:6]] == [
        [("credits_balance", "negative_credits")],
        [("credits_balance", "non_integer")],
        [("credits_balance", "non_integer")],
        [("credits_balance", "out_of_range")],
        [("credits_balance", "missing_value")],
        [("credits_balance", "non_integer")],
    ]
    assert results[6][0] is not None and results[6][0][14] == "42"


def test_credits_remaining_differing_from_the_balance_is_a_warning(tmp_path: Path) -> None:
    (result,) = checked([base_row(credits_balance="10", credits_remaining="12")], tmp_path)
    assert result[0] is not None
    assert [(i.code, i.severity) for i in result[1]] == [("credits_remaining_differs", "warning")]


def test_every_error_of_a_record_is_reported(tmp_path: Path) -> None:
    (result,) = checked(
        [
            base_row(
                email="nope",
                auth_provider="myspace",
                newsletter_opt_in="maybe",
                account_status="banned",
                stripe_customer_id="cust_1",
                billing_status="trial",
            )
        ],
        tmp_path,
    )
    assert result[0] is None
    assert codes(result) == [
        ("email", "invalid_email"),
        ("auth_provider", "unknown_provider"),
        ("newsletter_opt_in", "invalid_boolean"),
        ("account_status", "unknown_status"),
        ("stripe_customer_id", "invalid_stripe_id"),
        ("billing_status", "unknown_billing_status"),
    ]


def test_only_a_google_or_apple_record_with_its_id_may_go_without_an_email(
    tmp_path: Path,
) -> None:
    """Apple may give the address on the first login only (seed 001): such a record is
    matched by its provider id. Any other record still needs an e-mail."""
    results = checked(
        [
            base_row(email="", auth_provider="apple", provider_user_id="a-1"),
            base_row(email="  ", auth_provider="Google", provider_user_id="g-1"),
            base_row(email="", auth_provider="email", provider_user_id=""),
            base_row(email="", auth_provider="apple", provider_user_id=""),
            base_row(email="", auth_provider="myspace"),
        ],
        tmp_path,
    )
    apple, google, plain, no_id, unknown = results
    for (staged, issues), provider, subject in ((apple, "apple", "a-1"), (google, "google", "g-1")):
        assert staged is not None and issues == []
        assert (staged[3], staged[4], staged[5]) == (None, provider, subject)
        assert copy_line(staged).split("\t")[3] == "\\N"  # NULL in the COPY
    assert plain[0] is None and codes(plain) == [("email", "missing_value")]
    assert "email is required" in plain[1][0].message
    assert no_id[0] is None and codes(no_id) == [("provider_user_id", "missing_value")]
    assert codes(unknown) == [("auth_provider", "unknown_provider"), ("email", "missing_value")]


def test_stripe_ids_are_checked(tmp_path: Path) -> None:
    results = checked(
        [
            base_row(
                stripe_customer_id="", stripe_subscription_id="sub_1", billing_status="active"
            ),
            base_row(stripe_customer_id="cus_1", stripe_subscription_id="sub_1", billing_status=""),
            base_row(stripe_customer_id="cus_1", stripe_subscription_id="price_1"),
        ],
        tmp_path,
    )
    assert codes(results[0]) == [("stripe_subscription_id", "subscription_without_customer")]
    assert codes(results[1]) == [("billing_status", "missing_value")]
    assert codes(results[2]) == [("stripe_subscription_id", "invalid_stripe_id")]


# --- C-13 report cells -----------------------------------------------------------------------


def test_c13_formula_cells_are_neutralised_and_values_masked() -> None:
    cells = ['=HYPERLINK("http://x")', "+1", "-2", "@x", "\tcmd", "\rcmd", "plain"]
    assert [neutralise(c) for c in cells] == [
        '\'=HYPERLINK("http://x")',
        "'+1",
        "'-2",
        "'@x",
        "'\tcmd",
        "'\rcmd",
        "plain",
    ]
    assert shown("Bob.Smith@example.com") == "B***@example.com"
    assert len(shown("x" * 500)) == 64
    assert shown("x\udcff\ud800") == "x\\xff\\ud800"  # what surrogateescape reads
    out = io.StringIO()
    write_report(out, [Issue(2, 3, "display_name", "=1+2", "code", "-msg")])
    assert out.getvalue() == (
        "record_no,line_no,column,value,code,message\r\n2,3,display_name,'=1+2,code,'-msg\r\n"
    )


# --- C-14 hostile input ------------------------------------------------------------------------


def test_c14_nul_control_characters_huge_fields_and_wide_rows(tmp_path: Path) -> None:
    rows = list(legacy_rows(5))
    rows[0]["display_name"] = "nul\x00here"
    rows[1]["display_name"] = "bell\x07"
    rows[2]["display_name"] = "HUGE"
    text = render(rows).replace("HUGE", "x" * (10 * 1024 * 1024))
    lines = text.split("\r\n")
    lines[4] = ",".join(["1"] * 1000)  # record 5: 1,000 columns
    header, records = read(write(tmp_path, "\r\n".join(lines)))
    validator = Validator(header, dict(PLAN_MAP_V1), NOW)
    results = [validator.check(r) for r in records]
    assert [codes(r) for r in results] == [
        [("display_name", "control_character")],
        [("display_name", "control_character")],
        [("", "field_too_large")],
        [("", "wrong_field_count")],
        [],
    ]
    assert FIELD_LIMIT < 10 * 1024 * 1024
    assert results[0][1][0].value == "nul\\0here"


def test_c14_a_header_of_a_thousand_columns_is_read(tmp_path: Path) -> None:
    columns = [*COLUMNS, *(f"extra_{i}" for i in range(981))]
    header, records = read(write(tmp_path, render(list(legacy_rows(2)), columns)))
    assert header.width == 1000 and len(records) == 2
    assert sum(i.code == "unknown_column" for i in header.issues) == 981
