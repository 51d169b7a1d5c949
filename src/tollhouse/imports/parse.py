"""Reading the legacy users.csv: RFC 4180 records, streamed, numbered two ways.

`record_no` counts records with the header as 1; `line_no` is the physical line a record
starts on (a quoted field may hold line breaks, so the two differ). A record the CSV reader
cannot take (an unterminated quote, a field over the size limit) is reported on the line it
starts and reading resumes on the next physical line, so one bad quote never swallows the
records after it. A record of the wrong width over several lines is such a quote when one of
its later lines reads alone as a whole record, or when they start one read on across lines;
otherwise it is one ragged record.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tollhouse.errors import ImportFileRejected

#: Every column of seed 001, in its order.
COLUMNS = (
    "user_id",
    "email",
    "auth_provider",
    "provider_user_id",
    "display_name",
    "created_at",
    "last_login_at",
    "plan_tier",
    "credits_total",
    "credits_remaining",
    "credits_balance",
    "daily_credit_limit",
    "credits_last_reset",
    "monthly_reset_at",
    "newsletter_opt_in",
    "account_status",
    "stripe_customer_id",
    "stripe_subscription_id",
    "billing_status",
)
#: Without these the file is refused; a missing optional column reads as empty.
REQUIRED = ("user_id", "email", "auth_provider", "plan_tier", "credits_balance")

#: The largest field accepted (a bigger one is a record error, never a crash).
FIELD_LIMIT = 1 << 20

_SURROGATE = re.compile("[\udc80-\udcff]")


def _undecodable(text: str) -> bool:
    """Whether the text holds a byte that was not UTF-8 (read with surrogateescape)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


@dataclass(frozen=True)
class HeaderIssue:
    """A warning about the header (record 1)."""

    column: str
    code: str
    message: str


@dataclass(frozen=True)
class Header:
    """Where each known column is, and what the header had beside."""

    positions: dict[str, int]
    width: int
    issues: tuple[HeaderIssue, ...]


@dataclass(frozen=True)
class RawRecord:
    """One record as read, or the structural error that stopped it from being read."""

    record_no: int
    line_no: int
    fields: list[str]
    error: tuple[str, str] | None = None


def check_header(names: list[str]) -> Header:
    """The header's column positions, or `ImportFileRejected` (before anything is written)."""
    cleaned = [name.strip().lstrip("\ufeff").strip().lower() for name in names]
    seen: dict[str, int] = {}
    for i, name in enumerate(cleaned):
        if name in seen:
            raise ImportFileRejected(
                f"the header names column {name!r} twice (columns {seen[name] + 1} and {i + 1})",
                reason="duplicate_column",
                column=name,
            )
        seen[name] = i
    missing = [c for c in REQUIRED if c not in seen]
    if missing:
        raise ImportFileRejected(
            f"the header lacks required column(s) {', '.join(missing)}",
            reason="missing_column",
            columns=missing,
        )
    issues = [
        HeaderIssue(name, "unknown_column", "this column is not in the legacy format; ignored")
        for name in cleaned
        if name not in COLUMNS
    ]
    issues += [
        HeaderIssue(c, "missing_column", f"optional column {c!r} is absent; read as empty")
        for c in COLUMNS
        if c not in seen
    ]
    return Header({c: seen[c] for c in COLUMNS if c in seen}, len(names), tuple(issues))


def sniff_encoding(head: bytes, encoding: str | None) -> str:
    """The codec to read with: the one asked for, else UTF-8 (a BOM is dropped). A UTF-16 or
    UTF-32 file is refused with its name unless asked for by `--encoding`."""
    if encoding:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise ImportFileRejected(
                f"unknown encoding {encoding!r}", reason="unknown_encoding"
            ) from None
        return "utf-8-sig" if name == "utf-8" else name
    for bom, name in (
        (codecs.BOM_UTF32_LE, "UTF-32LE"),
        (codecs.BOM_UTF32_BE, "UTF-32BE"),
        (codecs.BOM_UTF16_LE, "UTF-16LE"),
        (codecs.BOM_UTF16_BE, "UTF-16BE"),
    ):
        if head.startswith(bom):
            raise _not_utf8(name)
    if b"\x00" in head[:200] and head[:200].count(b"\x00") * 4 >= len(head[:200]):
        raise _not_utf8("UTF-16 (no BOM)")
    return "utf-8-sig"


def _not_utf8(name: str) -> ImportFileRejected:
    return ImportFileRejected(
        f"the file is encoded as {name}, not UTF-8: convert it, or pass --encoding",
        reason="wrong_encoding",
        encoding=name,
    )


def _holds_a_record(lines: list[str], width: int) -> bool:
    """Whether one of these lines, read alone, is a record of `width` fields. The lines a
    quote left open ran into are; those a ragged record's quoted line break continues on
    are not (one record then, reported as `wrong_field_count`)."""
    for line in lines:
        try:
            if len(next(csv.reader([line], strict=True), ())) == width:
                return True
        except csv.Error:
            continue
    return False


#: How far past a record's lines the parser looks to tell an open quote from a ragged record.
LOOKAHEAD_LINES = 100


def _starts_a_record(lines: _Lines, width: int) -> bool:
    """Whether the lines the last record took after its first, read again as records, begin
    with one of `width` fields, reading on into the file as far as that record goes (the
    lines read ahead are put back). A quote left open can close inside the next record's own
    quoted line break: that record is then whole only across its lines, not on any line
    alone."""
    probe = lines.taken[1:]
    kept = len(lines.taken)
    ahead: list[str] = []
    try:
        while True:
            try:
                return len(next(csv.reader(iter(probe), strict=True), ())) == width
            except csv.Error as exc:
                if "unexpected end of data" not in str(exc) or len(ahead) >= LOOKAHEAD_LINES:
                    return False
            line = next(lines.lines, None)
            if line is None:
                return False
            ahead.append(line)
            probe.append(line)
    finally:
        del lines.taken[kept:]
        lines.put_back(ahead)


class _Lines:
    """The file's physical lines, with the ones a failed record took put back in front.
    `taken` holds the lines handed out since it was last cleared."""

    def __init__(self, stream: IO[str]) -> None:
        self._replay: deque[str] = deque()
        self.taken: list[str] = []
        self.lines = self._generate(stream)

    def _generate(self, stream: IO[str]) -> Iterator[str]:
        replay = self._replay
        for line in stream:
            while replay:
                self.taken.append(first := replay.popleft())
                yield first
            self.taken.append(line)
            yield line
        while replay:
            self.taken.append(first := replay.popleft())
            yield first

    def put_back(self, lines: list[str]) -> None:
        self._replay.extendleft(reversed(lines))


class CsvFile:
    """A legacy CSV file, read once, record by record, in constant memory."""

    def __init__(self, path: Path, encoding: str | None = None) -> None:
        self.path = path
        self.size = path.stat().st_size
        with path.open("rb") as raw:
            head = raw.read(4096)
        self.encoding = sniff_encoding(head, encoding)
        self.undecodable_records = 0
        self.records_read = 0

    def records(self) -> Iterator[Header | RawRecord]:
        """The header first, then every record (structural errors included)."""
        csv.field_size_limit(FIELD_LIMIT)
        with self.path.open(encoding=self.encoding, errors="surrogateescape", newline="") as stream:
            lines = _Lines(stream)
            reader = csv.reader(lines.lines, strict=True)
            try:
                first = next(reader)
            except StopIteration:
                raise ImportFileRejected("the file is empty", reason="empty_file") from None
            except csv.Error as exc:
                raise ImportFileRejected(
                    f"the header cannot be read: {exc}", reason="unreadable_header"
                ) from None
            if any(_undecodable(name) for name in first):
                raise _not_utf8("something else (the header is not valid UTF-8)")
            header = check_header(first)
            yield header
            line_no = len(lines.taken)
            record_no = 1
            while True:
                lines.taken.clear()
                start = line_no + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    record_no += 1
                    taken = list(lines.taken)
                    line_no += 1
                    self.undecodable_records += _undecodable(taken[0])
                    lines.put_back(taken[1:])
                    reader = csv.reader(lines.lines, strict=True)
                    code = "field_too_large" if "field larger" in str(exc) else "malformed_csv"
                    yield self._counted(RawRecord(record_no, start, [], (code, str(exc))))
                    continue
                taken = lines.taken
                if not row:  # a blank line is no record
                    line_no += len(taken)
                    continue
                record_no += 1
                if (
                    len(row) != header.width
                    and len(taken) > 1
                    and (
                        _holds_a_record(taken[1:], header.width)
                        or _starts_a_record(lines, header.width)
                    )
                ):
                    # A quote left open that ran into the next lines (records of their
                    # own): report the first line and read the others again as records.
                    line_no += 1
                    self.undecodable_records += _undecodable(taken[0])
                    lines.put_back(taken[1:])
                    reader = csv.reader(lines.lines, strict=True)
                    yield self._counted(
                        RawRecord(
                            record_no,
                            start,
                            [],
                            ("malformed_csv", "a quoted field is not closed on this record"),
                        )
                    )
                    continue
                line_no += len(taken)
                yield self._counted(self._check(RawRecord(record_no, start, row), header))

    def _counted(self, record: RawRecord) -> RawRecord:
        self.records_read += 1
        return record

    def _check(self, record: RawRecord, header: Header) -> RawRecord:
        row = record.fields
        undecodable = _undecodable("".join(row))
        # A ragged record's bad bytes count towards the file's refusal too.
        self.undecodable_records += undecodable
        if len(row) != header.width:
            return RawRecord(
                record.record_no,
                record.line_no,
                row,
                ("wrong_field_count", f"{len(row)} fields where the header has {header.width}"),
            )
        if undecodable:
            return RawRecord(
                record.record_no,
                record.line_no,
                row,
                ("invalid_encoding", "the record has bytes that are not UTF-8"),
            )
        return record
