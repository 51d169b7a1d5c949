"""A normalised text dump of the Tollhouse schema, to compare databases and migrations.

The test suite compares a freshly migrated database with the checked-in
`tests/schema.snapshot`; `tollhouse db schema` prints the same text for any database.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tollhouse.db.dsn import describe, split_password
from tollhouse.db.embedded import pgserver_module
from tollhouse.db.roles import SCHEMA
from tollhouse.errors import DatabaseError

_SKIPPED_PREFIXES = ("--", "SET ", "SELECT pg_catalog.set_config", "\\restrict", "\\unrestrict")


def pg_dump_path() -> str:
    """The pg_dump bundled with the embedded server, else the one on PATH."""
    bundled = pgserver_module().utils.POSTGRES_VERSIONS.get(18)
    if bundled is not None and (Path(bundled) / "pg_dump").exists():
        return str(Path(bundled) / "pg_dump")
    found = shutil.which("pg_dump")
    if found is None:
        raise DatabaseError("pg_dump was not found")
    return found


def normalise(dump: str) -> str:
    """Drop comments, session settings and blank lines, which vary between runs."""
    lines = [
        line.rstrip()
        for line in dump.splitlines()
        if line.strip() and not line.startswith(_SKIPPED_PREFIXES)
    ]
    return "\n".join(lines) + "\n"


def dump_schema(dsn: str) -> str:
    """The normalised DDL of the `tollhouse` schema of the database at `dsn`."""
    # The password goes through the environment, never onto a command line `ps` can read.
    bare, password = split_password(dsn)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    result = subprocess.run(  # noqa: S603 - fixed executable, arguments are not a shell string
        [pg_dump_path(), "--schema-only", "--no-owner", f"--schema={SCHEMA}", f"--dbname={bare}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise DatabaseError(f"pg_dump of {describe(dsn)} failed: {reason}")
    return normalise(result.stdout)
