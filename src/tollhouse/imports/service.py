"""The import of a legacy users.csv: stage and classify the whole file in one transaction,
then apply it in batches, each of which deletes the staged rows it applied (its checkpoint).

- A crash (even SIGKILL) while staging leaves nothing: the transaction never committed.
- A crash while applying leaves whole batches applied and the others still staged; the next
  run of the same file with the same options finds the open run and applies what is left,
  with the outcomes decided at staging, so the end state and the report are those of an
  uninterrupted run.
- A run of a file already imported classifies every record as unchanged: no new rows, no
  new ledger entries.
- `dry_run` does all of phase 1, writes the same report, and rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psycopg
import structlog
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from tollhouse.db.errors import translate
from tollhouse.db.pool import Conn, Database, connect
from tollhouse.db.queries import Queries
from tollhouse.errors import ImportFileRejected, ImportInProgress, InvalidRequest
from tollhouse.ids import uuid7
from tollhouse.imports.feed import CHILD_FROM_BYTES, Done, Issues, Rows, feed
from tollhouse.imports.parse import CsvFile
from tollhouse.imports.report import Issue, ReportWriter
from tollhouse.imports.validate import DateRules, parse_plan_map

queries = Queries("tollhouse.imports", "queries.sql")
log = structlog.get_logger(__name__)

#: Formats of the staging rows and options; a change here starts new runs, never resumes.
FORMAT_VERSION = 1
#: More records than this (per thousand) with bytes that are not UTF-8: the file is taken for
#: another encoding (Latin-1, say) and refused.
UNDECODABLE_PER_MILLE = 1

#: (phase, done, total): "staging" counts records read (total unknown: 0), "applying"
#: counts records applied of the file's.
Progress = Callable[[str, int, int], None]

#: The identity and credits steps of a batch, in order; the billing step follows them.
APPLY_STEPS = (
    "apply_created",
    "accounts_joins",
    "apply_accounts",
    "accounts_joins_done",
    "apply_updated",
    "apply_updated_plans",
)


@dataclass(frozen=True)
class ImportSummary:
    """What a run did, record by record: read = created + updated + unchanged + merged +
    skipped + failed."""

    run_id: uuid.UUID | None
    dry_run: bool
    resumed: bool
    records_read: int
    created: int
    updated: int
    unchanged: int
    merged: int
    skipped: int
    failed: int
    warnings: int
    identities_linked: int
    billing_customers: int
    billing_subscriptions: int

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_id"] = str(self.run_id) if self.run_id else None
        return data


def file_sha256(path: Path) -> bytes:
    """The SHA-256 of a file: with the options, the key a rerun resumes by."""
    if not path.is_file():
        raise InvalidRequest(f"no file {path}", field="file")
    digest = hashlib.sha256()
    with path.open("rb") as raw:
        while block := raw.read(1 << 20):
            digest.update(block)
    return digest.digest()


class ImportService:
    """Imports legacy users.csv files (seed 001) into the model."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def import_users(
        self,
        path: Path,
        *,
        dry_run: bool = False,
        report: Path | IO[str] | None = None,
        plan_map: Sequence[str] = (),
        batch_size: int = 1000,
        encoding: str | None = None,
        progress: Progress | None = None,
        workers: int = 2,
        date_format: str = "iso",
        epoch_seconds: bool = False,
        time_zone: str = "UTC",
    ) -> ImportSummary:
        """Import `path`; write the report CSV to `report` if given. Record errors never
        stop the run; only a file that cannot be read as a whole is refused (nothing is
        written then). `workers` connections apply batches side by side. `date_format`,
        `epoch_seconds` and `time_zone` say how dates are read (see `DateRules`)."""
        if not 1 <= batch_size <= 100_000:
            raise InvalidRequest("--batch-size must be between 1 and 100000", field="batch_size")
        file_sha = await asyncio.to_thread(file_sha256, path)
        async with self._db.connection() as conn:
            cur = await conn.execute(queries["plans"])
            plans = frozenset(row[0] for row in await cur.fetchall())
        try:
            mapping = parse_plan_map(list(plan_map), plans)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="plan_map") from None
        try:
            dates = DateRules(date_format, epoch_seconds, time_zone)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="date_format") from None
        csv_file = CsvFile(path, encoding)  # refuses UTF-16 & co. before anything else
        options: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "plan_map": mapping,
            "encoding": csv_file.encoding,
        }
        if not dates.is_default():  # the default adds nothing: runs of before resume
            options["dates"] = asdict(dates)
        options_sha = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).digest()
        report_to = report
        tick = progress or (lambda phase, done, total: None)

        async with self._db.connection() as conn:
            run_id = None
            if not dry_run:
                cur = await conn.execute(
                    queries["open_run"], {"file_sha256": file_sha, "options_sha256": options_sha}
                )
                row = await cur.fetchone()
                run_id = row[0] if row else None
            resumed = run_id is not None
            if run_id is None:
                run_id = uuid7()
                async with conn.transaction(force_rollback=dry_run):
                    counts = await self._stage(
                        conn,
                        csv_file,
                        mapping,
                        dates,
                        run_id,
                        {
                            "file_sha256": file_sha,
                            "options_sha256": options_sha,
                            "file_name": path.name,
                            "options": Jsonb(options),
                        },
                        tick,
                    )
                    if dry_run:
                        rows = await self._write_report(conn, run_id, report_to)
                        return self._summary(None, True, False, counts, rows, (0, 0))
            log.info("import_applying", run_id=str(run_id), resumed=resumed, file=path.name)
            billing = await self._apply(conn, run_id, batch_size, workers, tick)
            cur = await conn.execute(queries["run"], {"run_id": run_id})
            run = await cur.fetchone()
            assert run is not None
            counts = dict(run[2])
            await conn.execute(queries["finish_run"], {"run_id": run_id})
            rows = await self._write_report(conn, run_id, report_to)
        log.info("import_done", run_id=str(run_id), **counts)
        return self._summary(run_id, False, resumed, counts, rows, billing)

    @staticmethod
    def _summary(
        run_id: uuid.UUID | None,
        dry_run: bool,
        resumed: bool,
        counts: dict[str, int],
        rows: tuple[int, int],
        billing: tuple[int, int],
    ) -> ImportSummary:
        return ImportSummary(
            run_id=run_id,
            dry_run=dry_run,
            resumed=resumed,
            records_read=counts["records_read"],
            created=counts["created"],
            updated=counts["updated"],
            unchanged=counts["unchanged"],
            merged=counts["merged"],
            skipped=counts["skipped"],
            failed=counts["failed"],
            warnings=rows[1],
            identities_linked=counts["identities_linked"],
            billing_customers=billing[0],
            billing_subscriptions=billing[1],
        )

    # --- phase 1: stage and classify, in the caller's transaction --------------------------

    async def _stage(
        self,
        conn: Conn,
        csv_file: CsvFile,
        mapping: dict[str, str],
        dates: DateRules,
        run_id: uuid.UUID,
        run_fields: dict[str, Any],
        tick: Progress,
    ) -> dict[str, int]:
        await conn.execute(queries["staging_memory"])
        await conn.execute(queries["create_incoming"])
        await conn.execute(queries["create_incoming_issues"])
        done: Done | None = None
        # Issues wait in a temporary file (one COPY at a time per connection): memory stays
        # flat however many records have warnings.
        with tempfile.TemporaryFile("w+", encoding="utf-8") as issues_file:
            messages = feed(
                csv_file.path,
                csv_file.encoding,
                mapping,
                datetime.now(UTC),
                dates,
                child=csv_file.size >= CHILD_FROM_BYTES,
            )
            async with (
                contextlib.aclosing(messages),
                conn.cursor().copy(queries["copy_incoming"]) as copy,
            ):
                async for message in messages:
                    if isinstance(message, Rows):
                        await copy.write(message.text)
                        tick("staging", message.records_read, 0)
                    elif isinstance(message, Issues):
                        issues_file.write(message.text)
                    else:
                        done = message
            assert done is not None
            read = done.records_read
            tick("staging", read, 0)
            if done.undecodable_records * 1000 > read * UNDECODABLE_PER_MILLE:
                raise ImportFileRejected(
                    f"{done.undecodable_records} of {read} records are not valid UTF-8:"
                    " the file looks like another encoding (Latin-1?); pass --encoding",
                    reason="wrong_encoding",
                )
            issues_file.seek(0)
            async with conn.cursor().copy(queries["copy_incoming_issues"]) as copy:
                while block := issues_file.read(1 << 20):
                    await copy.write(block)

        await conn.execute(
            queries["create_run"],
            {**run_fields, "id": run_id, "records": read},
        )
        await conn.execute(queries["analyze_incoming"])
        await conn.execute(queries["classify_joins"], {"records": read})
        await conn.execute(queries["classify"])
        await conn.execute(queries["classify_billing"])
        await conn.execute(queries["analyze_classified"])
        await conn.execute(queries["stage"], {"run_id": run_id})
        await conn.execute(queries["record_issues"], {"run_id": run_id})
        cur = await conn.execute(queries["counts"])
        row = await cur.fetchone()
        assert row is not None and cur.description is not None
        counts = {col.name: int(value) for col, value in zip(cur.description, row, strict=True)}
        counts["failed"] += done.failed
        counts["records_read"] = read
        await conn.execute(queries["set_counts"], {"run_id": run_id, "counts": Jsonb(counts)})
        return counts

    # --- phase 2: apply in batches -----------------------------------------------------------

    async def _apply(
        self, conn: Conn, run_id: uuid.UUID, batch_size: int, workers: int, tick: Progress
    ) -> tuple[int, int]:
        """Apply what is left of the run: batches of new and changed users side by side on
        `workers` connections, then the merged identities. Returns the billing rows pending."""
        cur = await conn.execute(queries["lock_run"], {"run_id": run_id})
        locked = await cur.fetchone()
        if not locked or not locked[0]:
            raise ImportInProgress(
                "another process is importing this file right now", run_id=str(run_id)
            )
        pending = [0, 0]
        try:
            cur = await conn.execute(queries["run"], {"run_id": run_id})
            run = await cur.fetchone()
            assert run is not None
            staged, remaining = int(run[1]), int(run[3])
            done = staged - remaining
            cur = await conn.execute(
                queries["batches"], {"run_id": run_id, "batch_size": batch_size}
            )
            todo: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
            for after, through, _ in await cur.fetchall():
                todo.put_nowait((int(after), int(through)))
            tick("applying", done, staged)  # the phase starts now, not with its first batch

            async def worker() -> None:
                nonlocal done
                async with self._own_connection() as own:
                    while not todo.empty():
                        after, through = todo.get_nowait()
                        applied, billing = await self._apply_batch(own, run_id, after, through)
                        pending[0] += billing[0]
                        pending[1] += billing[1]
                        done += applied
                        tick("applying", done, staged)

            tasks = [
                asyncio.create_task(worker()) for _ in range(max(1, min(workers, todo.qsize())))
            ]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            cur = await conn.execute(queries["merges_left"], {"run_id": run_id})
            merges = await cur.fetchone()
            if merges and merges[0]:
                async with conn.transaction():
                    params = {"run_id": run_id, "after": 0, "through": 2**31 - 1}
                    await conn.execute(queries["apply_merged_identities"], params)
                    await conn.execute(queries["batch_done"], {**params, "outcomes": ["merged"]})
                done += int(merges[0])
                tick("applying", done, staged)
        finally:
            await conn.execute(queries["unlock_run"], {"run_id": run_id})
        return pending[0], pending[1]

    @contextlib.asynccontextmanager
    async def _own_connection(self) -> AsyncIterator[Conn]:
        """A connection of a batch worker, outside the pool (which may be small)."""
        try:
            conn = await connect(self._db.dsn, as_service=True)
            try:
                yield conn
            finally:
                await conn.close()
        except psycopg.Error as exc:
            raise translate(exc) from exc

    async def _apply_batch(
        self, conn: Conn, run_id: uuid.UUID, after: int, through: int
    ) -> tuple[int, tuple[int, int]]:
        """One batch in one transaction, its staged rows deleted as its checkpoint."""
        params: dict[str, Any] = {"run_id": run_id, "after": after, "through": through}
        async with conn.transaction():
            for step in APPLY_STEPS:
                await conn.execute(queries[step], params)
            billing = await self._apply_billing(conn, params)
            cur = await conn.execute(
                queries["batch_done"], {**params, "outcomes": ["created", "updated"]}
            )
            if not cur.rowcount:
                raise ImportInProgress(
                    "another process applied this batch", run_id=str(run_id), after=after
                )
        return cur.rowcount, billing

    async def _apply_billing(self, conn: Conn, params: dict[str, Any]) -> tuple[int, int]:
        """The billing step of a batch: each Stripe customer routed to (and recorded for) its
        user's personal tenant, each subscription recorded as a state older than any Stripe
        event, and the subscribers' accounts moved to their effective plan. Returns the
        customers and subscriptions written (0 on a rerun: every write is idempotent)."""
        await conn.execute(queries["billing_routes"], params)
        customers = await conn.execute(queries["billing_customers"], params)
        subscriptions = await conn.execute(queries["billing_subscriptions"], params)
        await conn.execute(queries["billing_plans"], params)
        return customers.rowcount, subscriptions.rowcount

    # --- the report -------------------------------------------------------------------------

    async def _write_report(
        self, conn: Conn, run_id: uuid.UUID, report: Path | IO[str] | None
    ) -> tuple[int, int]:
        """Stream the run's report to `report` (or count it); returns (rows, warnings)."""
        if conn.info.transaction_status == TransactionStatus.IDLE:
            async with conn.transaction():  # a server-side cursor lives in a transaction
                return await self._write_report(conn, run_id, report)
        with contextlib.ExitStack() as stack:
            if isinstance(report, Path):
                out: IO[str] | None = stack.enter_context(
                    report.open("w", encoding="utf-8", newline="")
                )
            else:
                out = report
            writer = ReportWriter(out)
            cur = conn.cursor(name=f"import_report_{run_id.hex}")
            await cur.execute(queries["issues"], {"run_id": run_id})
            async for record_no, line_no, column, value, code, message, severity in cur:
                writer.add(Issue(record_no, line_no, column, value, code, message, severity))
            await cur.close()
        return writer.rows, writer.warnings
