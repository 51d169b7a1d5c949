"""The report: one CSV row per problem or note, safe to open in a spreadsheet.

Values are shortened to 64 characters, e-mail addresses are masked (`b***@x.com`), NUL and
bytes that were not UTF-8 are written as escapes (`\\0`, `\\xff`), and a cell that a
spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, TAB or CR) is prefixed
with `'` (OWASP CSV injection).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

REPORT_COLUMNS = ("record_no", "line_no", "column", "value", "code", "message")
VALUE_LIMIT = 64

_EMAIL = re.compile(r"([^\s@,;<>\"']+)@([^\s@,;<>\"']+)")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: Surrogates: what surrogateescape makes of a byte that is not UTF-8 (U+DC80-U+DCFF for
#: 0x80-0xff), or any other that no UTF-8 text may hold.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Issue:
    """One line of the report. `value` is already masked and shortened."""

    record_no: int
    line_no: int
    column: str
    value: str
    code: str
    message: str
    severity: str = "error"


def _mask_address(match: re.Match[str]) -> str:
    local = match.group(1)
    return f"{local[:1]}***@{match.group(2)}"


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def shown(value: str) -> str:
    """A value as the report may show it: e-mails masked, at most 64 characters, NUL as
    `\\0`, and a byte that was not UTF-8 (read with surrogateescape) as `\\xff`: whatever the
    file held, the result is text that UTF-8 and PostgreSQL take."""
    if "@" in value:
        value = _EMAIL.sub(_mask_address, value)
    value = value.replace("\x00", "\\0")
    if not value.isascii():
        value = _SURROGATE.sub(_escape_surrogate, value)
    if len(value) > VALUE_LIMIT:
        value = value[: VALUE_LIMIT - 1] + "…"
    return value


def neutralise(cell: str) -> str:
    """A cell a spreadsheet will show as text, never run as a formula."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


class ReportWriter:
    """Writes the report CSV (CRLF line ends, RFC 4180) row by row; with no output it only
    counts."""

    def __init__(self, out: IO[str] | None) -> None:
        self._writer = csv.writer(out, lineterminator="\r\n") if out is not None else None
        self.rows = 0
        self.warnings = 0
        if self._writer is not None:
            self._writer.writerow(REPORT_COLUMNS)

    def add(self, issue: Issue) -> None:
        self.rows += 1
        self.warnings += issue.severity == "warning"
        if self._writer is not None:
            self._writer.writerow(
                [
                    issue.record_no,
                    issue.line_no,
                    neutralise(issue.column),
                    neutralise(issue.value),
                    neutralise(issue.code),
                    neutralise(issue.message),
                ]
            )


def write_report(out: IO[str], issues: Iterable[Issue]) -> int:
    """Write a whole report; returns the rows written."""
    writer = ReportWriter(out)
    for issue in issues:
        writer.add(issue)
    return writer.rows
