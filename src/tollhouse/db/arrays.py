"""PostgreSQL array literals for the parameters of a batch call.

A batch function takes one array per field (`credit_debit_batch_v1(uuid[], bigint[], ...)`).
psycopg adapts a Python list element by element in Python, which cost about 18 µs per debit
of a batch; these build the array's text form with one join instead (a query casts it:
`%(ids)s::uuid[]`). Every string element is quoted, so none can be mistaken for NULL or
split by a comma or brace; None is an unquoted NULL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text_array(values: Iterable[str | None]) -> str:
    """`text[]` literal."""
    return "{" + ",".join("NULL" if v is None else _quoted(v) for v in values) + "}"


def uuid_array(values: Iterable[uuid.UUID | None]) -> str:
    """`uuid[]` literal (a UUID's text needs no quoting)."""
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def int_array(values: Iterable[int]) -> str:
    """`bigint[]` literal."""
    return "{" + ",".join([str(int(v)) for v in values]) + "}"


def jsonb_array(values: Iterable[Mapping[str, Any] | None]) -> str:
    """`jsonb[]` literal of JSON objects (an empty or missing one is `{}` or NULL)."""
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"{}"' if not v else _quoted(json.dumps(v)) for v in values
        )
        + "}"
    )
