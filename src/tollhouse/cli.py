"""The `tollhouse` command: a thin Typer adapter over the services.

Every failure is one line on stderr and a non-zero exit: 2 for a wrong command line,
1 for anything else. Set TOLLHOUSE_DEBUG=1 to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from tollhouse import __version__
from tollhouse.app import (
    Tollhouse,
    credits_conservation,
    database_url,
    identity_config,
    runtime_url,
)
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
app.add_typer(db_app, name="db")

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
            runtime_url(settings, dsn), min_size=1, max_size=2, identity=identity_config(settings)
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
