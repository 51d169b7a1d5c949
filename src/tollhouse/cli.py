"""The `tollhouse` command: a thin Typer adapter over the services.

Every failure is one line on stderr and a non-zero exit: 2 for a wrong command line,
1 for anything else. Set TOLLHOUSE_DEBUG=1 to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from tollhouse import __version__
from tollhouse.app import (
    Tollhouse,
    billing_config,
    credits_conservation,
    database_url,
    identity_config,
    runtime_url,
)
from tollhouse.credits import DebitRequest, rejection
from tollhouse.db import migrate as migrations
from tollhouse.db.dsn import redact
from tollhouse.db.embedded import EmbeddedPostgres, start_detached
from tollhouse.db.pool import Database
from tollhouse.errors import InvalidRequest, TollhouseError, UserNotFound
from tollhouse.health import HealthService
from tollhouse.identity import User
from tollhouse.keys import ApiKey
from tollhouse.observability import configure_logging
from tollhouse.settings import Settings, load_settings

T = TypeVar("T")

app = typer.Typer(
    name="tollhouse",
    help="Users, identities, billing and credits for a SaaS or AI product, on PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
keys_app = typer.Typer(help="Service API keys for server-to-server calls.", no_args_is_help=True)
users_app = typer.Typer(help="Users: create, look up, grant roles, delete.", no_args_is_help=True)
db_app = typer.Typer(help="The database Tollhouse uses.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(users_app, name="users")
credits_app = typer.Typer(
    help="Credits: balances, grants, debits, the ledger.", no_args_is_help=True
)
plans_app = typer.Typer(
    help="Plans: monthly credits, daily caps, overdraft limits.", no_args_is_help=True
)
app.add_typer(credits_app, name="credits")
app.add_typer(plans_app, name="plans")
app.add_typer(db_app, name="db")
orgs_app = typer.Typer(
    help="Organisations: members, roles, invitations, credit limits.", no_args_is_help=True
)
app.add_typer(orgs_app, name="orgs")
stripe_app = typer.Typer(
    help="Stripe: resync from the API, replay stored events, list them.", no_args_is_help=True
)
app.add_typer(stripe_app, name="stripe")
import_app = typer.Typer(
    help="Backfill from a legacy system (users.csv of seed 001).", no_args_is_help=True
)
app.add_typer(import_app, name="import")

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the embedded PostgreSQL keeps its data [env: TOLLHOUSE_DATA_DIR].",
        show_default=False,
    ),
]


def _settings(data_dir: Path | None = None, **overrides: object) -> Settings:
    settings = load_settings(data_dir=data_dir, **overrides)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _with_services(settings: Settings, work: Callable[[Tollhouse], Awaitable[T]]) -> T:
    """Run `work` against a migrated database, then release everything."""

    async def go(dsn: str) -> T:
        migrations.require_current(await migrations.status(dsn))
        async with Tollhouse.open(
            runtime_url(settings, dsn),
            min_size=1,
            max_size=2,
            identity=identity_config(settings),
            billing=billing_config(settings),
        ) as tollhouse:
            return await work(tollhouse)

    with database_url(settings) as dsn:
        return asyncio.run(go(dsn))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tollhouse {__version__}")
        raise typer.Exit


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Tollhouse: users, identities, billing and credits, on PostgreSQL."""


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8000].")] = None,
    data_dir: DataDir = None,
    migrate: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Apply pending migrations first.")
    ] = True,
) -> None:
    """Run the HTTP service (on the embedded PostgreSQL unless DATABASE_URL is set)."""
    from tollhouse import server  # uvicorn and FastAPI load only for this command

    overrides: dict[str, object] = {"host": host, "port": port}
    if not migrate:
        overrides["migrate_on_start"] = False
    settings = _settings(data_dir, **overrides)
    server.run(settings, announce=lambda text: typer.echo(text))


@app.command()
def migrate(
    status: Annotated[
        bool, typer.Option("--status", help="List migrations; apply nothing.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Apply pending database migrations (safe to run twice, or twice at once)."""
    settings = _settings(data_dir)
    with database_url(settings) as dsn:
        if status:
            for item in asyncio.run(migrations.status(dsn)):
                when = item.applied_at.isoformat(timespec="seconds") if item.applied_at else ""
                typer.echo(f"{item.version:04d}  {item.state:8}  {item.name:30}  {when}".rstrip())
            return
        applied = asyncio.run(migrations.migrate(dsn))
    for migration in applied:
        typer.echo(f"applied {migration.filename}")
    typer.echo(f"{len(applied)} migration(s) applied" if applied else "nothing to apply")


@app.command()
def doctor(data_dir: DataDir = None) -> None:
    """Check the settings, the database, migrations, roles and row-level security."""
    settings = _settings(data_dir)
    where = (
        redact(settings.database_url) if settings.database_url else f"embedded in {settings.pgdata}"
    )
    typer.echo(f"settings  database: {where}")

    with database_url(settings) as dsn:
        # No pool: the checks use their own connections, so a dead database is reported.
        health = HealthService(
            Database(dsn), [credits_conservation], runtime_dsn=runtime_url(settings, dsn)
        )
        results = [(c.name, c.ok, c.detail) for c in asyncio.run(health.doctor())]
    for name, ok, detail in results:
        typer.echo(f"{'ok' if ok else 'FAIL':4}  {name:10}  {detail}")
    if not all(ok for _, ok, _ in results):
        raise typer.Exit(1)


def _key_row(key: ApiKey) -> dict[str, str | bool | None]:
    return {
        "id": str(key.id),
        "name": key.name,
        "prefix": key.prefix,
        "created_at": key.created_at.isoformat(timespec="seconds"),
        "last_used_at": key.last_used_at.isoformat(timespec="seconds")
        if key.last_used_at
        else None,
        "revoked_at": key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else None,
    }


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A label, unique among active keys.")],
    data_dir: DataDir = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    created = _with_services(_settings(data_dir), lambda t: t.keys.create(name))
    typer.echo(created.secret)
    typer.echo(
        f"created key {created.key.name!r} ({created.key.id}); it is shown only once", err=True
    )


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    data_dir: DataDir = None,
) -> None:
    """List keys (never their secrets)."""
    keys = _with_services(
        _settings(data_dir), lambda t: t.keys.list(include_revoked=include_revoked)
    )
    for key in keys:
        row = _key_row(key)
        if as_json:
            typer.echo(json.dumps(row))
        else:
            state = "revoked" if key.revoked_at else "active"
            used = row["last_used_at"] or "never used"
            typer.echo(f"{row['id']}  th_{key.prefix}_…  {state:7}  {key.name:24}  {used}")


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id, or the name of an active key.")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key; calls with it are refused from then on."""
    revoked = _with_services(_settings(data_dir), lambda t: t.keys.revoke(key))
    typer.echo(f"revoked key {revoked.name!r} ({revoked.id})")


def _user_json(user: User) -> str:
    from tollhouse.api.schemas import UserOut

    return UserOut.of(user).model_dump_json(indent=2)


def _user_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequest(f"{value!r} is not a user id") from None


@users_app.command("create")
def users_create(
    email: Annotated[str | None, typer.Option(help="Primary e-mail address.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Display name.")] = None,
    verified: Annotated[bool, typer.Option(help="Mark the address verified.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Create a user (with its personal tenant) and print it as JSON."""

    async def work(t: Tollhouse) -> User:
        return await t.users.create(email=email, display_name=name, email_verified=verified)

    typer.echo(_user_json(_with_services(_settings(data_dir), work)))


@users_app.command("show")
def users_show(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    data_dir: DataDir = None,
) -> None:
    """Print a user with e-mails, identities, roles and plan as JSON."""
    uid = _user_id(user_id)
    user = _with_services(_settings(data_dir), lambda t: t.users.get(uid, include_deleted=True))
    typer.echo(_user_json(user))


@users_app.command("find")
def users_find(
    email: Annotated[str, typer.Option(help="An e-mail address of the user.")],
    data_dir: DataDir = None,
) -> None:
    """Find a user by e-mail address; exit 1 when there is none."""
    user = _with_services(_settings(data_dir), lambda t: t.users.find_by_email(email))
    if user is None:
        raise UserNotFound(f"no user with the address {email.strip().lower()!r}")
    typer.echo(_user_json(user))


@users_app.command("set-role")
def users_set_role(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    role: Annotated[str, typer.Argument(help="superuser, admin, user or member.")],
    revoke: Annotated[bool, typer.Option("--revoke", help="Take the role away.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Grant (or with --revoke, take away) a role."""
    uid = _user_id(user_id)
    user = _with_services(
        _settings(data_dir), lambda t: t.users.set_role(uid, role, granted=not revoke)
    )
    typer.echo(f"{user.id}: roles {', '.join(user.roles) or '(none)'}")


@users_app.command("delete")
def users_delete(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    restore: Annotated[bool, typer.Option("--restore", help="Undo a soft delete.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Soft-delete a user (sessions end, sign-in stops); --restore undoes it."""
    uid = _user_id(user_id)
    settings = _settings(data_dir)
    if restore:
        user = _with_services(settings, lambda t: t.users.restore(uid))
        typer.echo(f"restored {user.id}")
    else:
        user = _with_services(settings, lambda t: t.users.delete(uid))
        typer.echo(f"deleted {user.id} (restore with 'tollhouse users delete --restore')")


UserOpt = Annotated[str | None, typer.Option("--user", help="A user id (its personal tenant).")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="A tenant id.")]


def _payer(user: str | None, tenant: str | None) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    """(user_id, tenant_id) from the options: exactly one of them."""
    if (user is None) == (tenant is None):
        raise InvalidRequest("name exactly one payer: --user or --tenant")
    return (_user_id(user) if user else None, _user_id(tenant) if tenant else None)


@credits_app.command("balance")
def credits_balance(
    user: UserOpt = None, tenant: TenantOpt = None, data_dir: DataDir = None
) -> None:
    """Print a payer's balance, limits and live grants as JSON."""
    user_id, tenant_id = _payer(user, tenant)
    found = _with_services(
        _settings(data_dir), lambda t: t.credits.balance(user_id=user_id, tenant_id=tenant_id)
    )
    typer.echo(json.dumps(dataclasses.asdict(found), default=str, indent=2))


@credits_app.command("grant")
def credits_grant(
    amount: Annotated[int, typer.Argument(help="Credits to add (> 0).")],
    source: Annotated[
        str, typer.Option(help="purchase, promo, adjustment or import.")
    ] = "adjustment",
    source_id: Annotated[str | None, typer.Option(help="Grant once per this id.")] = None,
    priority: Annotated[int, typer.Option(help="Higher is spent first.")] = 0,
    user: UserOpt = None,
    tenant: TenantOpt = None,
    data_dir: DataDir = None,
) -> None:
    """Add credits to a payer."""
    user_id, tenant_id = _payer(user, tenant)
    result = _with_services(
        _settings(data_dir),
        lambda t: t.credits.grant(
            amount=amount,
            source=source,
            source_id=source_id,
            priority=priority,
            user_id=user_id,
            tenant_id=tenant_id,
        ),
    )
    state = "already granted" if result.replayed else "granted"
    typer.echo(f"{state} {amount} to {result.tenant_id}: balance {result.balance_after}")


@credits_app.command("adjust")
def credits_adjust(
    amount: Annotated[int, typer.Option("--amount", help="Credits to add (>0) or take (<0).")],
    adjustment_id: Annotated[str, typer.Option("--id", help="Applies once per id.")],
    note: Annotated[str, typer.Option(help="Why (kept with the adjustment).")],
    user: UserOpt = None,
    tenant: TenantOpt = None,
    data_dir: DataDir = None,
) -> None:
    """Correct a payer's credits either way, with a note; exit 1 when refused."""
    user_id, tenant_id = _payer(user, tenant)
    result = _with_services(
        _settings(data_dir),
        lambda t: t.credits.adjust(
            amount=amount,
            adjustment_id=adjustment_id,
            note=note,
            user_id=user_id,
            tenant_id=tenant_id,
        ),
    )
    failure = rejection(result)
    if failure is not None:
        raise failure
    again = " (replayed)" if result.replayed else ""
    typer.echo(f"adjusted {result.tenant_id} by {amount}: balance {result.balance_after}{again}")


@credits_app.command("time-zone")
def credits_time_zone(
    time_zone: Annotated[str, typer.Argument(help="An IANA zone, e.g. Europe/Paris.")],
    user: UserOpt = None,
    tenant: TenantOpt = None,
    data_dir: DataDir = None,
) -> None:
    """Set where a payer's day (its daily cap) starts."""
    user_id, tenant_id = _payer(user, tenant)
    found = _with_services(
        _settings(data_dir),
        lambda t: t.credits.set_time_zone(time_zone, user_id=user_id, tenant_id=tenant_id),
    )
    typer.echo(f"{found.tenant_id}: day starts at midnight {found.time_zone}")


@credits_app.command("debit")
def credits_debit(
    amount: Annotated[int, typer.Argument(help="Credits to take (> 0).")],
    turn_id: Annotated[str, typer.Option("--turn-id", help="The idempotency key.")],
    reason: Annotated[str, typer.Option(help="Ledger reason.")] = "adjustment",
    user: UserOpt = None,
    tenant: TenantOpt = None,
    data_dir: DataDir = None,
) -> None:
    """Take credits from a payer (idempotent per --turn-id); exit 1 when rejected."""
    user_id, tenant_id = _payer(user, tenant)
    request = DebitRequest(
        amount=amount, turn_id=turn_id, reason=reason, user_id=user_id, tenant_id=tenant_id
    )
    result = _with_services(_settings(data_dir), lambda t: t.credits.debit_alone(request))
    error = rejection(result)
    if error is not None:
        raise error
    typer.echo(
        f"debited {amount} from {result.tenant_id}: balance {result.balance_after}"
        + (" (replayed)" if result.replayed else "")
    )


@credits_app.command("ledger")
def credits_ledger(
    limit: Annotated[int, typer.Option(help="Entries to show.")] = 20,
    user: UserOpt = None,
    tenant: TenantOpt = None,
    data_dir: DataDir = None,
) -> None:
    """Print a payer's latest ledger entries, newest first."""
    user_id, tenant_id = _payer(user, tenant)
    entries, _ = _with_services(
        _settings(data_dir),
        lambda t: t.credits.ledger(limit=limit, user_id=user_id, tenant_id=tenant_id),
    )
    for entry in entries:
        typer.echo(
            f"{entry.created_at.isoformat(timespec='seconds')}  {entry.kind:7}  "
            f"{entry.delta:>+10}  = {entry.balance_after:<10}  {entry.reason}  "
            f"{entry.turn_id or ''}".rstrip()
        )


@credits_app.command("sweep")
def credits_sweep(data_dir: DataDir = None) -> None:
    """Apply what is due everywhere: new periods' allowances, expiries, expired holds."""
    count = _with_services(_settings(data_dir), lambda t: t.credits.sweep())
    typer.echo(f"{count} account(s) brought up to date")


@plans_app.command("list")
def plans_list(data_dir: DataDir = None) -> None:
    """List the plans."""
    for plan in _with_services(_settings(data_dir), lambda t: t.credits.plans()):
        cap = plan.daily_cap if plan.daily_cap is not None else "-"
        typer.echo(
            f"{plan.name:12} monthly {plan.monthly_credits:>10}  daily cap {cap!s:>8}  "
            f"overdraft {plan.overdraft_limit}"
        )


@plans_app.command("set")
def plans_set(
    name: Annotated[str, typer.Argument(help="The plan's name.")],
    monthly_credits: Annotated[int, typer.Option(help="Credits granted each period.")],
    daily_cap: Annotated[int | None, typer.Option(help="Credits per day, or none.")] = None,
    overdraft_limit: Annotated[int, typer.Option(help="How far below zero.")] = 0,
    data_dir: DataDir = None,
) -> None:
    """Create or change a plan (applies from each account's next period)."""
    plan = _with_services(
        _settings(data_dir),
        lambda t: t.credits.set_plan(
            name,
            monthly_credits=monthly_credits,
            daily_cap=daily_cap,
            overdraft_limit=overdraft_limit,
        ),
    )
    typer.echo(
        f"plan {plan.name}: monthly {plan.monthly_credits}, daily cap "
        f"{plan.daily_cap}, overdraft {plan.overdraft_limit}"
    )


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@stripe_app.command("sync")
def stripe_sync(
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Only events and objects created on or after this date (YYYY-MM-DD)."
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Ingest the events Stripe kept that never arrived here, then page through Stripe's
    products, prices, customers, subscriptions (canceled ones too) and invoices, and
    reconcile them here (needs TOLLHOUSE_STRIPE_API_KEY)."""
    start = _since(since)
    report = _with_services(_settings(data_dir), lambda t: t.billing.sync(since=start))
    for kind, count in report.counts.items():
        typer.echo(f"{kind:14} {count}")
    for failure in report.failures:
        typer.echo(f"failed  {failure['kind']} {failure['id']}: {failure['error']}")
    if report.failures:
        raise typer.Exit(1)


@stripe_app.command("replay")
def stripe_replay(
    status: Annotated[
        str, typer.Option("--status", help="Which stored events: failed, received or parked.")
    ] = "failed",
    data_dir: DataDir = None,
) -> None:
    """Apply stored events of a status again (each once; effects are never doubled)."""
    deliveries = _with_services(_settings(data_dir), lambda t: t.billing.replay(status))
    for d in deliveries:
        typer.echo(f"{d.event_id}  {d.type:40}  {d.status}  {d.error or ''}".rstrip())
    typer.echo(f"{len(deliveries)} event(s) replayed")


@stripe_app.command("events")
def stripe_events(
    status: Annotated[
        str | None,
        typer.Option(help="Only this status: received, processed, failed, ignored, parked."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Events to show, newest first.")] = 50,
    data_dir: DataDir = None,
) -> None:
    """List stored Stripe events, newest first."""
    found = _with_services(
        _settings(data_dir), lambda t: t.billing.events(status=status, limit=limit)
    )
    for ev in found:
        typer.echo(
            f"{ev.received_at.isoformat(timespec='seconds')}  {ev.stripe_event_id}  "
            f"{ev.type:40}  {ev.status:9}  {ev.last_error or ''}".rstrip()
        )


class DateOrder(enum.StrEnum):
    """`--date-format` (see tollhouse.imports.validate.DateRules)."""

    iso = "iso"
    dmy = "dmy"
    mdy = "mdy"


def _plan_pairs(values: list[str] | None) -> list[str]:
    for value in values or []:
        if "=" not in value or not value.partition("=")[2].strip():
            raise typer.BadParameter(f"{value!r} is not OLD=NEW")
    return values or []


def _time_zone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise typer.BadParameter(
            f"{value!r} is not a known time zone (e.g. Europe/Paris)"
        ) from None
    return value


class _ProgressLine:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._shown = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if total:
            width = 30
            filled = width * done // total
            text = f"{phase:9} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}"
        else:
            text = f"{phase:9} {done:,} records read"
        if text != self._shown:
            sys.stderr.write("\r" + text)
            sys.stderr.flush()
            self._shown = text

    def close(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\n")


@import_app.command("users")
def import_users(
    file: Annotated[Path, typer.Argument(help="The legacy users.csv.", show_default=False)],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check and report everything; write nothing.")
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write the record-by-record report CSV here."),
    ] = None,
    plan_map: Annotated[
        list[str] | None,
        typer.Option(
            "--plan-map",
            help="Map a legacy tier onto a plan, OLD=NEW (repeatable; default enterprise=power;"
            " =NEW gives an empty tier a plan).",
            callback=_plan_pairs,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=100_000, help="Records per transaction.")
    ] = 1000,
    encoding: Annotated[
        str | None, typer.Option(help="The file's encoding, if not UTF-8 (e.g. latin-1).")
    ] = None,
    date_format: Annotated[
        DateOrder,
        typer.Option(
            "--date-format",
            help="How nn/nn/yyyy dates read: dmy (day first) or mdy (month first);"
            " iso refuses them as ambiguous. ISO 8601 is always accepted.",
        ),
    ] = DateOrder.iso,
    epoch_seconds: Annotated[
        bool,
        typer.Option("--epoch-seconds", help="Read whole numbers in date columns as Unix seconds."),
    ] = False,
    time_zone: Annotated[
        str,
        typer.Option(
            "--time-zone",
            help="IANA zone of times without an offset (a bare date is its midnight).",
            callback=_time_zone,
        ),
    ] = "UTC",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Import users, identities, opening balances and plans from a legacy users.csv.

    Idempotent (a second run changes nothing) and resumable (after a crash, run the same
    command again). Record errors never stop the import; they go to the report.
    """
    progress = _ProgressLine()
    try:
        summary = _with_services(
            _settings(data_dir),
            lambda t: t.imports.import_users(
                file,
                dry_run=dry_run,
                report=report,
                plan_map=plan_map or [],
                batch_size=batch_size,
                encoding=encoding,
                progress=progress,
                date_format=date_format.value,
                epoch_seconds=epoch_seconds,
                time_zone=time_zone,
            ),
        )
    finally:
        progress.close()
    if as_json:
        typer.echo(json.dumps(summary.as_dict()))
        return
    title = "dry run: nothing written" if dry_run else f"run {summary.run_id}"
    if summary.resumed:
        title += " (resumed)"
    typer.echo(title)
    for name in ("records_read", "created", "updated", "unchanged", "merged", "skipped"):
        typer.echo(f"  {name.replace('_', ' '):14} {getattr(summary, name):>10,}")
    typer.echo(f"  {'failed':14} {summary.failed:>10,}")
    typer.echo(f"  {'warnings':14} {summary.warnings:>10,}")
    if report is not None:
        typer.echo(f"report: {report}")


@db_app.command("url")
def db_url(
    start: Annotated[
        bool, typer.Option("--start", help="Start the embedded server if it is not running.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Print the DSN of the database (for psql): DATABASE_URL, or the embedded server's."""
    settings = _settings(data_dir)
    if settings.database_url:
        typer.echo(settings.database_url)
    elif start:
        typer.echo(start_detached(settings.pgdata))
    else:
        typer.echo(EmbeddedPostgres.running_dsn(settings.pgdata))


@db_app.command("schema")
def db_schema(data_dir: DataDir = None) -> None:
    """Print the normalised DDL of the tollhouse schema (to diff two databases)."""
    from tollhouse.db.schema import dump_schema

    settings = _settings(data_dir)
    with database_url(settings) as dsn:
        typer.echo(dump_schema(dsn), nl=False)


# --- organisations (the service acting; no session) ------------------------------------------

OrgArg = Annotated[str, typer.Argument(help="The organisation's tenant id.")]
MemberArg = Annotated[str, typer.Argument(help="A member's user id.")]
RoleOpt = Annotated[str, typer.Option(help="owner, admin or member.")]
LimitOpt = Annotated[int, typer.Option("--credit-limit", help="Credits per period; -1 = no limit.")]


def _json(model: Any) -> str:
    return str(model.model_dump_json(indent=2))


def _org_id(value: str, what: str = "an organisation id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequest(f"{value!r} is not {what}") from None


def _role(value: str) -> Any:
    if value not in ("owner", "admin", "member"):
        raise InvalidRequest(f"{value!r} is not a role: owner, admin or member")
    return value


@orgs_app.command("create")
def orgs_create(
    name: Annotated[str, typer.Argument(help="Display name.")],
    slug: Annotated[str, typer.Option(help="Unique, lower-case letters, digits and -.")],
    owner: Annotated[str, typer.Option(help="The owner's user id.")],
    data_dir: DataDir = None,
) -> None:
    """Create an organisation owned by --owner."""
    from tollhouse.api.routes.orgs import OrgOut

    owner_id = _user_id(owner)
    org = _with_services(_settings(data_dir), lambda t: t.orgs.create(name, slug, owner_id))
    typer.echo(_json(OrgOut.of(org)))


@orgs_app.command("show")
def orgs_show(org: OrgArg, data_dir: DataDir = None) -> None:
    """One organisation (deleted ones too)."""
    from tollhouse.api.routes.orgs import OrgOut

    tenant = _org_id(org)
    found = _with_services(_settings(data_dir), lambda t: t.orgs.get(tenant, include_deleted=True))
    typer.echo(_json(OrgOut.of(found)))


@orgs_app.command("list")
def orgs_list(
    user: Annotated[str, typer.Option("--user", help="A user id.")], data_dir: DataDir = None
) -> None:
    """The organisations a user belongs to."""
    from tollhouse.api.routes.orgs import OrgList, OrgOut

    uid = _user_id(user)
    found = _with_services(_settings(data_dir), lambda t: t.orgs.for_user(uid))
    typer.echo(_json(OrgList(organisations=[OrgOut.of(o) for o in found])))


@orgs_app.command("members")
def orgs_members(org: OrgArg, data_dir: DataDir = None) -> None:
    """Members with their roles, credit limits and use this period."""
    from tollhouse.api.routes.orgs import MemberList, MemberOut

    tenant = _org_id(org)
    found = _with_services(_settings(data_dir), lambda t: t.orgs.members(tenant))
    typer.echo(_json(MemberList(members=[MemberOut.of(m) for m in found])))


@orgs_app.command("add-member")
def orgs_add_member(
    org: OrgArg,
    user: MemberArg,
    role: RoleOpt = "member",
    credit_limit: LimitOpt = -1,
    data_dir: DataDir = None,
) -> None:
    """Add an existing user."""
    from tollhouse.api.routes.orgs import MemberOut

    tenant, uid, as_role = _org_id(org), _user_id(user), _role(role)
    member = _with_services(
        _settings(data_dir),
        lambda t: t.orgs.add_member(tenant, uid, as_role, credit_limit=credit_limit),
    )
    typer.echo(_json(MemberOut.of(member)))


@orgs_app.command("set-role")
def orgs_set_role(org: OrgArg, user: MemberArg, role: RoleOpt, data_dir: DataDir = None) -> None:
    """Change a member's role (an organisation keeps at least one owner)."""
    from tollhouse.api.routes.orgs import MemberOut

    tenant, uid, as_role = _org_id(org), _user_id(user), _role(role)
    member = _with_services(_settings(data_dir), lambda t: t.orgs.change_role(tenant, uid, as_role))
    typer.echo(_json(MemberOut.of(member)))


@orgs_app.command("set-limit")
def orgs_set_limit(
    org: OrgArg, user: MemberArg, credit_limit: LimitOpt, data_dir: DataDir = None
) -> None:
    """Set a member's credit limit per period."""
    from tollhouse.api.routes.orgs import MemberOut

    tenant, uid = _org_id(org), _user_id(user)
    member = _with_services(
        _settings(data_dir), lambda t: t.orgs.set_credit_limit(tenant, uid, credit_limit)
    )
    typer.echo(_json(MemberOut.of(member)))


@orgs_app.command("remove-member")
def orgs_remove_member(org: OrgArg, user: MemberArg, data_dir: DataDir = None) -> None:
    """Remove a member; its pending holds on the pool are voided."""
    tenant, uid = _org_id(org), _user_id(user)
    _with_services(_settings(data_dir), lambda t: t.orgs.remove_member(tenant, uid))
    typer.echo(f"removed {uid} from {tenant}")


@orgs_app.command("transfer")
def orgs_transfer(org: OrgArg, user: MemberArg, data_dir: DataDir = None) -> None:
    """Make a member the owner of record."""
    from tollhouse.api.routes.orgs import OrgOut

    tenant, uid = _org_id(org), _user_id(user)
    found = _with_services(_settings(data_dir), lambda t: t.orgs.transfer_ownership(tenant, uid))
    typer.echo(_json(OrgOut.of(found)))


@orgs_app.command("invite")
def orgs_invite(
    org: OrgArg,
    email: Annotated[str, typer.Argument(help="The address to invite.")],
    role: RoleOpt = "member",
    credit_limit: LimitOpt = -1,
    data_dir: DataDir = None,
) -> None:
    """Invite an address; prints the token once (only its hash is kept)."""
    from tollhouse.api.routes.orgs import IssuedOut

    tenant, as_role = _org_id(org), _role(role)
    if as_role == "owner":
        raise InvalidRequest("invite as admin or member; make owners with transfer")
    issued = _with_services(
        _settings(data_dir),
        lambda t: t.orgs.invite(tenant, email, as_role, credit_limit=credit_limit),
    )
    typer.echo(_json(IssuedOut.of(issued)))


@orgs_app.command("invitations")
def orgs_invitations(org: OrgArg, data_dir: DataDir = None) -> None:
    """The organisation's invitations, newest first."""
    from tollhouse.api.routes.orgs import InvitationList, InvitationOut

    tenant = _org_id(org)
    found = _with_services(_settings(data_dir), lambda t: t.orgs.invitations(tenant))
    typer.echo(_json(InvitationList(invitations=[InvitationOut.of(i) for i in found])))


@orgs_app.command("revoke")
def orgs_revoke(
    org: OrgArg,
    invitation: Annotated[str, typer.Argument(help="The invitation id.")],
    data_dir: DataDir = None,
) -> None:
    """Revoke an invitation."""
    tenant, inv = _org_id(org), _org_id(invitation, "an invitation id")
    found = _with_services(_settings(data_dir), lambda t: t.orgs.revoke(tenant, inv))
    typer.echo(f"invitation {found.id} to {found.email}: {found.status}")


@orgs_app.command("delete")
def orgs_delete(
    org: OrgArg,
    restore: Annotated[bool, typer.Option("--restore", help="Undo a soft delete.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Soft-delete an organisation (or --restore it)."""
    tenant = _org_id(org)
    if restore:
        _with_services(_settings(data_dir), lambda t: t.orgs.restore(tenant))
        typer.echo(f"restored {tenant}")
    else:
        _with_services(_settings(data_dir), lambda t: t.orgs.delete(tenant))
        typer.echo(f"deleted {tenant}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `tollhouse` console script."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="tollhouse", standalone_mode=False)
    except typer.TyperException as exc:
        # Typer's (vendored click) usage errors: wrong option, missing argument, bad value.
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", exc.exit_code)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except TollhouseError as exc:
        _fail(exc.message, 1)
    except Exception as exc:
        if os.environ.get("TOLLHOUSE_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (TOLLHOUSE_DEBUG=1 shows the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"tollhouse: error: {first}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
