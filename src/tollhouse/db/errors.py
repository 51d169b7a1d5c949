"""Translate PostgreSQL errors into Tollhouse errors, by constraint name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import errors as pg

from tollhouse.errors import (
    ConstraintViolation,
    DatabaseError,
    DatabaseUnavailable,
    InvalidRequest,
    TollhouseError,
    UniqueViolation,
)

ConstraintMap = Mapping[str, type[TollhouseError]]

#: SQLSTATEs after which the whole transaction may simply be tried again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
#: Data exceptions that can only come from a value the caller sent (a NUL byte, a string or
#: number too large for its column): bad input, not a server fault.
BAD_INPUT_SQLSTATES = frozenset({"22001", "22003", "22021", "22P05", "54000"})


def translate(exc: psycopg.Error, constraints: ConstraintMap | None = None) -> TollhouseError:
    """The domain error for a driver error.

    A violated constraint named in `constraints` becomes that error; other integrity
    errors become generic ones; connection failures become `DatabaseUnavailable`.
    """
    diag = getattr(exc, "diag", None)
    name = diag.constraint_name if diag is not None else None
    fields: dict[str, Any] = {"sqlstate": exc.sqlstate} if exc.sqlstate else {}
    if name:
        fields["constraint"] = name
    if constraints and name and name in constraints:
        return constraints[name](**fields)
    if exc.sqlstate in BAD_INPUT_SQLSTATES or (
        isinstance(exc, psycopg.DataError) and exc.sqlstate is None  # refused by the driver
    ):
        return InvalidRequest(f"a value is not acceptable: {_first_line(exc)}", **fields)
    if isinstance(exc, pg.UniqueViolation):
        return UniqueViolation(**fields)
    if isinstance(exc, pg.IntegrityError):
        return ConstraintViolation(**fields)
    if isinstance(exc, psycopg.OperationalError) and exc.sqlstate in (None, "57P01", "08006"):
        return DatabaseUnavailable(f"the database connection failed: {_first_line(exc)}", **fields)
    return DatabaseError(f"the database failed: {_first_line(exc)}", **fields)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
