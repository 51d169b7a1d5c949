"""`tollhouse serve` on the embedded database, from a fresh data dir, as the README says."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.e2e.conftest import Service, clean_env, error_lines, run_cli, start_service


def _postmaster_running(data_dir: Path) -> bool:
    return (data_dir / "pgdata" / "postmaster.pid").exists()


def test_fresh_start_serves_stops_on_sigterm_and_keeps_data_across_restarts(
    tmp_path: Path, services: list[Service]
) -> None:
    env = clean_env(tmp_path)
    data_dir = Path(env["TOLLHOUSE_DATA_DIR"])

    first = start_service(env, tmp_path)
    services.append(first)
    assert first.wait_ready(60) < 60
    assert first.process.stdout is not None
    banner = first.process.stdout.readline() + first.process.stdout.readline()
    match = re.search(r"^\s+(th_\S+)$", banner, re.MULTILINE)
    assert match, banner
    auth = {"Authorization": f"Bearer {match[1]}"}
    created = httpx.post(f"{first.url}/v1/keys", json={"name": "kept"}, headers=auth)
    assert created.status_code == 201
    # Logs are JSON lines; the request's line carries the id its answer carried.
    request_id = created.headers["x-request-id"]
    # The access line is written once the answer went out: give a loaded machine a moment.
    deadline = time.monotonic() + 10
    while True:
        entries = [json.loads(line) for line in first.logs().splitlines() if line.strip()]
        matching = [e for e in entries if e.get("request_id") == request_id]
        if matching or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (logged,) = matching
    assert (logged["event"], logged["route"], logged["status"]) == ("request", "/v1/keys", 201)
    assert match[1] not in first.logs()  # the key itself is never logged
    assert _postmaster_running(data_dir)

    assert first.stop(signal.SIGTERM) == 0
    assert not _postmaster_running(data_dir), "SIGTERM left the embedded PostgreSQL running"

    second = start_service(env, tmp_path)
    services.append(second)
    second.wait_ready(60)
    names = httpx.get(f"{second.url}/v1/keys", headers=auth).json()["keys"]
    assert {k["name"] for k in names} == {"bootstrap", "kept"}
    assert second.stop(signal.SIGINT) == 0
    assert "th_" not in second.stdout(), "a second bootstrap key was printed"
    assert not _postmaster_running(data_dir)


def test_a_killed_service_does_not_keep_the_database_running_after_the_next_stop(
    tmp_path: Path, services: list[Service]
) -> None:
    """A service killed with SIGKILL never tells pgserver it let go of the server; the next
    service forgets it at start, so its own SIGTERM stops the embedded PostgreSQL."""
    env = clean_env(tmp_path)
    data_dir = Path(env["TOLLHOUSE_DATA_DIR"])
    try:
        killed = start_service(env, tmp_path)
        services.append(killed)
        killed.wait_ready(60)
        assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
        assert _postmaster_running(data_dir)  # pgserver's server outlives its users
        users = json.loads((data_dir / "pgdata" / ".handle_pids.json").read_text())
        assert killed.process.pid in users

        second = start_service(env, tmp_path)
        services.append(second)
        second.wait_ready(60)
        assert second.stop(signal.SIGTERM) == 0
        assert not _postmaster_running(data_dir), second.logs()
    finally:
        _stop_postmaster(data_dir)


def _stop_postmaster(data_dir: Path) -> None:
    """Stops an embedded server a failed test left behind (fast shutdown)."""
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def test_serve_without_migrating_an_empty_database_refuses_to_start(tmp_path: Path) -> None:
    result = run_cli(["serve", "--port", "0", "--no-migrate"], clean_env(tmp_path))
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert "no Tollhouse schema yet: run 'tollhouse migrate'" in line
    assert not _postmaster_running(tmp_path / "data")


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.0])
def test_a_stop_signal_during_start_up_leaves_nothing_running(
    tmp_path: Path, services: list[Service], delay: float
) -> None:
    service = start_service(clean_env(tmp_path), tmp_path)
    services.append(service)
    time.sleep(delay)
    # 0: stopped in order; -15: the signal came before Python set its handler (nothing ran).
    assert service.stop(signal.SIGTERM) in (0, -signal.SIGTERM), service.logs()
    assert not _postmaster_running(tmp_path / "data"), service.logs()


def test_an_edited_migration_stops_migrate_and_serve(tmp_path: Path, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # What the runner sees when 0001_foundation.sql changed after it was applied.
        conn.execute("UPDATE tollhouse.schema_migrations SET checksum = 'edited' WHERE version = 1")
    env = clean_env(tmp_path, DATABASE_URL=dsn)
    for args in (["migrate"], ["serve", "--port", "0"]):
        result = run_cli(args, env)
        assert result.returncode == 1, result
        (line,) = error_lines(result.stderr)
        assert "0001_foundation.sql" in line and "changed after it was applied" in line
        assert "Traceback" not in result.stderr
