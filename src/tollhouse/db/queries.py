"""Named SQL queries kept in `.sql` files next to the code that runs them.

A file holds several queries, each under a header line `-- name: query_name`; lines
after the header up to the next header form the query (comments included). Files are
read once per process. Queries are `LiteralString` so psycopg accepts them as trusted.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import LiteralString, cast

_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_queries(text: str, source: str = "<string>") -> dict[str, LiteralString]:
    """Split the text of a `.sql` file into its named queries."""
    parts = _HEADER.split(text)
    if parts[0].strip() and not all(
        line.startswith("--") or not line.strip() for line in parts[0].splitlines()
    ):
        raise ValueError(f"{source}: SQL before the first '-- name:' header")
    queries: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        body = body.strip()
        if not body:
            raise ValueError(f"{source}: query {name!r} is empty")
        if name in queries:
            raise ValueError(f"{source}: query {name!r} is defined twice")
        queries[name] = cast(LiteralString, body)
    return queries


class Queries:
    """The queries of one `.sql` file in a package, loaded on first use."""

    def __init__(self, package: str, filename: str) -> None:
        self._package = package
        self._filename = filename

    @functools.cached_property
    def _queries(self) -> dict[str, LiteralString]:
        text = resources.files(self._package).joinpath(self._filename).read_text("utf-8")
        return parse_queries(text, f"{self._package}/{self._filename}")

    def __getitem__(self, name: str) -> LiteralString:
        try:
            return self._queries[name]
        except KeyError:
            raise KeyError(f"no query {name!r} in {self._package}/{self._filename}") from None

    def names(self) -> list[str]:
        """The names of the queries in the file, in file order."""
        return list(self._queries)
