"""The database as `pg_dump --data-only` writes it: what a leaked backup would show."""

from __future__ import annotations

import subprocess

from tollhouse.db.schema import pg_dump_path


def data_dump(dsn: str) -> str:
    return subprocess.run(
        [pg_dump_path(), "--data-only", f"--dbname={dsn}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
