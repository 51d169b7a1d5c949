"""Small helpers for PostgreSQL connection strings."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict, make_conninfo


def redact(dsn: str) -> str:
    """The DSN with its password hidden, for messages and logs."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparsable database URL>"
    if params.get("password"):
        params["password"] = "***"  # noqa: S105 - a mask, not a password
    return make_conninfo("", **params)


def describe(dsn: str) -> str:
    """`host:port/dbname` of a DSN, for one-line messages."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparsable database URL>"
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


def with_dbname(dsn: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    return make_conninfo(dsn, dbname=dbname)


def as_user(dsn: str, user: str) -> str:
    """The same server and database, logged in as `user` (no password carried over)."""
    params = conninfo_to_dict(dsn)
    params.pop("password", None)
    params["user"] = user
    return make_conninfo("", **params)


def split_password(dsn: str) -> tuple[str, str | None]:
    """The DSN without its password, and the password (to pass through PGPASSWORD)."""
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    return make_conninfo("", **params), None if password is None else str(password)
