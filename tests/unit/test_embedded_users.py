"""pgserver's list of the embedded server's users: the pids of processes that no longer exist
are forgotten at start (tests/e2e/test_serve.py kills a service to show why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tollhouse.db.embedded import USERS_FILE, forget_dead_users


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_pids_of_processes_that_are_gone_are_forgotten(tmp_path: Path) -> None:
    dead = _dead_pid()
    users = tmp_path / USERS_FILE
    users.write_text(json.dumps([os.getpid(), dead, 1]))
    assert forget_dead_users(tmp_path) == [dead]
    assert json.loads(users.read_text()) == [os.getpid(), 1]
    assert forget_dead_users(tmp_path) == []


def test_a_missing_or_unreadable_list_is_left_alone(tmp_path: Path) -> None:
    assert forget_dead_users(tmp_path) == []
    users = tmp_path / USERS_FILE
    for text in ("not json", '{"a": 1}', "[0, -1]", '["12"]'):
        users.write_text(text)
        assert forget_dead_users(tmp_path) == []
        assert users.read_text() == text
