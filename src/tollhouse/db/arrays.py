"""PostgreSQL array literals for the parameters of a batch call.

A batch function takes one array per field (`credit_debit_batch_v1(uuid[], bigint[], ...)`).
psycopg adapts a Python list element by element in Python, which cost about 18 µs per debit
of a batch; these build the array's text form with one join instead (a query casts it:
`%(ids)s::uuid[]`). Every string element is quoted, so none can be mistaken for NULL or
split by a comma or brace; None is an unquoted NULL.
"""

from __future__ import annotations

import json
import operator
import uuid
from collections.abc import Iterable, Mapping
from typing import Any


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text_array(values: Iterable[str | None]) -> str:
    """`text[]` literal."""
    return "{" + ",".join("NULL" if v is None else _quoted(v) for v in values) + "}"


def _uuid_text(value: uuid.UUID) -> str:
    if type(value) is not uuid.UUID:
        raise TypeError(f"not a UUID: {value!r}")
    return str(value)


def uuid_array(values: Iterable[uuid.UUID | None]) -> str:
    """`uuid[]` literal (a UUID's text needs no quoting; anything else is refused)."""
    return "{" + ",".join("NULL" if v is None else _uuid_text(v) for v in values) + "}"


def _int_text(value: int) -> str:
    if isinstance(value, bool):
        raise TypeError(f"not an integer: {value!r}")
    return str(operator.index(value))


def int_array(values: Iterable[int]) -> str:
    """`bigint[]` literal (a float or a bool is refused, not rounded or counted as 0/1)."""
    return "{" + ",".join([_int_text(v) for v in values]) + "}"


def _jsonb_text(value: Mapping[str, Any]) -> str:
    if isinstance(value, Mapping) and not value:
        return '"{}"'
    return _quoted(json.dumps(value, allow_nan=False))


def jsonb_array(values: Iterable[Mapping[str, Any] | None]) -> str:
    """`jsonb[]` literal of JSON objects (None is NULL)."""
    return "{" + ",".join("NULL" if v is None else _jsonb_text(v) for v in values) + "}"
