"""The file read and checked record by record into COPY text, in a child process for a big
file: Python's parsing then runs on one core while the server's COPY runs on another.

`feed(...)` yields the same messages whether the work runs here or in the child: `Rows`
(COPY lines of staged records), `Issues` (COPY lines of the report's issues) and, last,
`Done` (the counts). A file refused as a whole raises `ImportFileRejected` (from the child
too), before any row: nothing is written then.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
import sys
import traceback
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tollhouse.errors import ImportFileRejected
from tollhouse.imports.parse import CsvFile, Header
from tollhouse.imports.report import Issue, shown
from tollhouse.imports.validate import DateRules, Validator

#: Records per message (and per COPY write); bounds the memory of the staging phase.
CHUNK = 2000
#: Files smaller than this are read in this process (a child costs a few hundred ms).
CHILD_FROM_BYTES = 2 << 20
#: Bytes the pipe from the child may hold while the server catches up.
PIPE_BUFFER = 8 << 20

_LENGTH = struct.Struct("!I")

_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
#: subject, display_name, legacy_tier: the staged values that may hold what COPY escapes.
_FREE_TEXT = (5, 6, 9)


@dataclass(frozen=True)
class Rows:
    """COPY lines of staged records; `records_read` so far (for progress)."""

    text: str
    records_read: int


@dataclass(frozen=True)
class Issues:
    """COPY lines of issues (record_no, seq, line_no, severity, column, value, code, message,
    user_id)."""

    text: str


@dataclass(frozen=True)
class Done:
    """The whole file was read."""

    records_read: int
    undecodable_records: int
    failed: int


Message = Rows | Issues | Done


def copy_line(values: Sequence[str | None]) -> str:
    """A staged record as a line of COPY text."""
    cells = ["\\N" if v is None else v for v in values]
    for i in _FREE_TEXT:
        cell = cells[i]
        if cell != "\\N" and ("\\" in cell or "\t" in cell or "\n" in cell or "\r" in cell):
            cells[i] = cell.translate(_ESCAPE)
    return "\t".join(cells) + "\n"


def issue_line(issue: Issue, seq: int, user_id: str | None = None) -> str:
    """An issue as a line of COPY text; `user_id` is the id a failed record holds (on its
    first issue)."""
    return (
        "\t".join(
            [
                str(issue.record_no),
                str(seq),
                str(issue.line_no),
                issue.severity,
                issue.column.translate(_ESCAPE),
                issue.value.translate(_ESCAPE),
                issue.code.translate(_ESCAPE),
                issue.message.translate(_ESCAPE),
                "\\N" if user_id is None else user_id,
            ]
        )
        + "\n"
    )


def read_file(
    path: Path, encoding: str, plan_map: Mapping[str, str], now: datetime, dates: DateRules
) -> Iterator[Message]:
    """Read and check the whole file: the messages, in order, `Done` last."""
    csv_file = CsvFile(path, encoding)
    records = csv_file.records()
    header = next(records)
    assert isinstance(header, Header)
    # A column's name is the file's text like any value: shown, never raw (a NUL in it
    # failed the COPY; an address in it was neither masked nor cut).
    yield Issues(
        "".join(
            issue_line(
                Issue(1, 1, shown(h.column), shown(h.column), h.code, h.message, "warning"), seq
            )
            for seq, h in enumerate(header.issues)
        )
    )
    validator = Validator(header, plan_map, now, dates=dates)
    failed = 0
    rows: list[str] = []
    issues: list[str] = []
    for record in records:
        assert not isinstance(record, Header)
        staged, found = validator.check(record)
        held = None
        if staged is None:
            failed += 1
            held = validator.held_user_id(record)
        else:
            rows.append(copy_line(staged))
        for seq, issue in enumerate(found):
            issues.append(issue_line(issue, seq, held if seq == 0 else None))
        if len(rows) >= CHUNK:
            yield Rows("".join(rows), csv_file.records_read)
            rows.clear()
            if issues:
                yield Issues("".join(issues))
                issues.clear()
    if rows:
        yield Rows("".join(rows), csv_file.records_read)
    if issues:
        yield Issues("".join(issues))
    yield Done(csv_file.records_read, csv_file.undecodable_records, failed)


def child_main() -> None:
    """The child process: its arguments pickled on
    stdin; every message, or what stopped it, pickled on stdout, each after its length."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but messages on the pipe

    def send(item: object) -> None:
        data = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        out.write(_LENGTH.pack(len(data)))
        out.write(data)

    try:
        # The pipes join this process to its parent only: their pickles are trusted.
        path, encoding, plan_map, now, dates = pickle.load(sys.stdin.buffer)  # noqa: S301
        for message in read_file(path, encoding, plan_map, now, dates):
            send(message)
    except ImportFileRejected as exc:
        send(("rejected", exc.message, exc.fields))
    except BaseException:
        send(("error", traceback.format_exc(), None))
    out.flush()


async def feed(
    path: Path,
    encoding: str,
    plan_map: Mapping[str, str],
    now: datetime,
    dates: DateRules,
    *,
    child: bool,
) -> AsyncGenerator[Message, None]:
    """The messages of `read_file`, read in a child process when `child` (see
    `CHILD_FROM_BYTES`)."""
    if not child:
        for message in read_file(path, encoding, plan_map, now, dates):
            yield message
            await asyncio.sleep(0)
        return
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from tollhouse.imports.feed import child_main; child_main()",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=PIPE_BUFFER,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(
            pickle.dumps((path, encoding, dict(plan_map), now, dates), pickle.HIGHEST_PROTOCOL)
        )
        process.stdin.close()
        while True:
            try:
                head = await process.stdout.readexactly(_LENGTH.size)
                data = await process.stdout.readexactly(_LENGTH.unpack(head)[0])
                item = pickle.loads(data)  # noqa: S301 (our child's pipe)
            except asyncio.IncompleteReadError:
                item = ("error", "the reader process ended without finishing", None)
            if isinstance(item, Rows | Issues | Done):
                yield item
                if isinstance(item, Done):
                    return
                continue
            kind, message, fields = item
            if kind == "rejected":
                raise ImportFileRejected(message, **fields)
            raise RuntimeError(f"the import's reader process failed:\n{message}")
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()
