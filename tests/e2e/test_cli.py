"""The CLI as an operator runs it: migrate, keys, doctor, db url, and its errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import clean_env, error_lines, run_cli


def test_migrate_twice_then_status(tmp_path: Path, empty_dsn: str) -> None:
    env = clean_env(tmp_path, DATABASE_URL=empty_dsn)
    first = run_cli(["migrate"], env)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_foundation.sql" in first.stdout
    second = run_cli(["migrate"], env)
    assert second.returncode == 0
    assert second.stdout.strip() == "nothing to apply"
    status = run_cli(["migrate", "--status"], env)
    assert status.stdout.startswith("0001  applied   foundation")


def test_keys_lifecycle(tmp_path: Path, dsn: str) -> None:
    env = clean_env(tmp_path, DATABASE_URL=dsn)
    created = run_cli(["keys", "create", "--name", "ops"], env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("th_") and "shown only once" in created.stderr
    listed = run_cli(["keys", "list", "--json"], env)
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["name"] == "ops" and secret not in listed.stdout
    assert run_cli(["keys", "revoke", "ops"], env).returncode == 0
    assert run_cli(["keys", "list"], env).stdout == ""
    again = run_cli(["keys", "revoke", "ops"], env)
    assert again.returncode == 1
    assert error_lines(again.stderr) == ["tollhouse: error: no service API key 'ops'"]


def test_keys_need_a_migrated_database(tmp_path: Path, empty_dsn: str) -> None:
    result = run_cli(["keys", "list"], clean_env(tmp_path, DATABASE_URL=empty_dsn))
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert "tollhouse migrate" in line


def test_doctor_passes_then_catches_a_table_without_rls(tmp_path: Path, dsn: str) -> None:
    env = clean_env(tmp_path, DATABASE_URL=dsn)
    healthy = run_cli(["doctor"], env)
    assert healthy.returncode == 0, healthy.stdout
    assert [line.split()[:2] for line in healthy.stdout.splitlines()[1:]] == [
        ["ok", "database"],
        ["ok", "migrations"],
        ["ok", "roles"],
        ["ok", "rls"],
        ["ok", "functions"],
        ["ok", "credits"],
        ["ok", "runtime"],
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE tollhouse.careless (id int)")
    sick = run_cli(["doctor"], env)
    assert sick.returncode == 1
    assert "FAIL  rls         RLS not enabled and forced on: careless" in sick.stdout


def test_db_url(tmp_path: Path, dsn: str) -> None:
    external = run_cli(["db", "url"], clean_env(tmp_path, DATABASE_URL=dsn))
    assert external.stdout.strip() == dsn
    not_running = run_cli(["db", "url"], clean_env(tmp_path))
    assert not_running.returncode == 1
    assert "no embedded PostgreSQL is running" in error_lines(not_running.stderr)[0]


def test_version_and_help(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    assert run_cli(["--version"], env).stdout.startswith("tollhouse ")
    for command in (["serve"], ["migrate"], ["keys", "create"], ["db", "url"], ["doctor"]):
        result = run_cli([*command, "--help"], env)
        assert result.returncode == 0 and "Usage:" in result.stdout


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("case", "expected_code", "expected"),
    [
        ("unknown option", 2, "No such option: --bogus"),
        ("unreachable database", 1, "at 127.0.0.1:1/nothing: Connection refused"),
        ("data dir is a file", 1, "is not a directory"),
        ("port in use", 1, "cannot listen on 127.0.0.1:"),
        ("malformed .env", 1, "at line 2"),
        ("invalid setting", 1, "invalid setting port"),
        (
            "malformed database url",
            1,
            "invalid setting DATABASE_URL: is not a valid PostgreSQL URL",
        ),
    ],
)
def test_bad_input_is_one_clear_line(
    tmp_path: Path, case: str, expected_code: int, expected: str
) -> None:
    env = clean_env(tmp_path)
    args = ["serve", "--port", "0"]
    busy = None
    if case == "unknown option":
        args = ["serve", "--bogus"]
    elif case == "unreachable database":
        env["DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/nothing"
    elif case == "data dir is a file":
        blocker = tmp_path / "file"
        blocker.write_text("")
        env["TOLLHOUSE_DATA_DIR"] = str(blocker / "data")
    elif case == "port in use":
        busy = _busy_port()
        args = ["serve", "--port", str(busy.getsockname()[1])]
    elif case == "malformed .env":
        Path(env["TOLLHOUSE_ENV_FILE"]).write_text("TOLLHOUSE_HOST=127.0.0.1\nnot a setting\n")
    elif case == "malformed database url":
        env["DATABASE_URL"] = "postgresql://x:hunter2@[bad"
    elif case == "invalid setting":
        env["TOLLHOUSE_PORT"] = "eighty"
        args = ["serve"]
    try:
        result = run_cli(args, env)
    finally:
        if busy is not None:
            busy.close()
    assert result.returncode == expected_code, result
    (line,) = error_lines(result.stderr)
    assert expected in line
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr


def test_users_commands(tmp_path: Path, dsn: str) -> None:
    env = clean_env(tmp_path, DATABASE_URL=dsn)
    created = run_cli(["users", "create", "--email", "Cli@Example.com", "--name", "Cli"], env)
    assert created.returncode == 0, created.stderr
    user = json.loads(created.stdout)
    assert user["email"] == "cli@example.com" and user["personal_tenant_id"]
    found = run_cli(["users", "find", "--email", "CLI@example.com"], env)
    assert json.loads(found.stdout)["id"] == user["id"]
    role = run_cli(["users", "set-role", user["id"], "admin"], env)
    assert role.stdout.strip() == f"{user['id']}: roles admin, user"
    bad_role = run_cli(["users", "set-role", user["id"], "emperor"], env)
    assert bad_role.returncode == 1 and "role must be one of" in error_lines(bad_role.stderr)[0]
    assert run_cli(["users", "delete", user["id"]], env).returncode == 0
    shown = json.loads(run_cli(["users", "show", user["id"]], env).stdout)
    assert shown["deleted_at"] is not None
    missing = run_cli(["users", "find", "--email", "cli@example.com"], env)
    assert missing.returncode == 1
    assert run_cli(["users", "delete", "--restore", user["id"]], env).returncode == 0
    not_an_id = run_cli(["users", "show", "bob"], env)
    assert error_lines(not_an_id.stderr) == ["tollhouse: error: 'bob' is not a user id"]
    dup = run_cli(["users", "create", "--email", "cli@example.com"], env)
    assert dup.returncode == 1
    assert error_lines(dup.stderr) == [
        "tollhouse: error: The e-mail address belongs to another user."
    ]


def test_credits_and_plans_commands(tmp_path: Path, dsn: str) -> None:
    env = clean_env(tmp_path, DATABASE_URL=dsn)
    user = json.loads(run_cli(["users", "create", "--email", "cred@example.com"], env).stdout)
    who = ["--user", user["id"]]
    granted = run_cli(["credits", "grant", "50", "--source-id", "manual-1", *who], env)
    assert granted.stdout.strip().endswith("balance 150"), granted.stderr  # + free allowance
    again = run_cli(["credits", "grant", "50", "--source-id", "manual-1", *who], env)
    assert again.stdout.startswith("already granted")
    debited = run_cli(["credits", "debit", "20", "--turn-id", "cli-1", *who], env)
    assert debited.stdout.strip().endswith("balance 130")
    replay = run_cli(["credits", "debit", "20", "--turn-id", "cli-1", *who], env)
    assert replay.stdout.strip().endswith("(replayed)")
    broke = run_cli(["credits", "debit", "9999", "--turn-id", "cli-2", *who], env)
    assert broke.returncode == 1
    assert error_lines(broke.stderr) == ["tollhouse: error: This debit would exceed the daily cap."]
    balance = json.loads(run_cli(["credits", "balance", *who], env).stdout)
    assert (balance["balance"], balance["plan"]) == (130, "free")
    ledger = run_cli(["credits", "ledger", *who], env).stdout.splitlines()
    assert len(ledger) == 3 and "debit" in ledger[0]
    assert run_cli(["credits", "sweep"], env).stdout.strip().endswith("brought up to date")
    assert run_cli(["plans", "set", "team", "--monthly-credits", "500"], env).returncode == 0
    assert "team" in run_cli(["plans", "list"], env).stdout
    adjusted = run_cli(
        ["credits", "adjust", "--amount", "-30", "--id", "a-1", "--note", "fix", *who], env
    )
    assert adjusted.stdout.strip().endswith("balance 100"), adjusted.stderr
    too_far = run_cli(
        ["credits", "adjust", "--amount", "-500", "--id", "a-2", "--note", "x", *who], env
    )
    assert error_lines(too_far.stderr) == ["tollhouse: error: Not enough credits for this debit."]
    zone = run_cli(["credits", "time-zone", "Asia/Tokyo", *who], env)
    assert zone.stdout.strip().endswith("midnight Asia/Tokyo"), zone.stderr
    both = run_cli(["credits", "balance", "--user", user["id"], "--tenant", user["id"]], env)
    assert "exactly one payer" in error_lines(both.stderr)[0]


def test_orgs_commands(tmp_path: Path, dsn: str) -> None:
    env = clean_env(tmp_path, DATABASE_URL=dsn)
    boss = json.loads(run_cli(["users", "create", "--email", "boss@example.com"], env).stdout)
    hand = json.loads(run_cli(["users", "create", "--email", "hand@example.com"], env).stdout)
    created = run_cli(["orgs", "create", "Acme", "--slug", "acme", "--owner", boss["id"]], env)
    assert created.returncode == 0, created.stderr
    org = json.loads(created.stdout)["id"]
    added = run_cli(["orgs", "add-member", org, hand["id"], "--credit-limit", "5"], env)
    assert json.loads(added.stdout)["remaining_credits"] == 5
    limit = run_cli(["orgs", "set-limit", org, hand["id"], "--credit-limit", "-1"], env)
    assert json.loads(limit.stdout)["credit_limit"] == -1
    members = json.loads(run_cli(["orgs", "members", org], env).stdout)["members"]
    assert {m["role"] for m in members} == {"owner", "member"}
    invited = json.loads(run_cli(["orgs", "invite", org, "new@example.com"], env).stdout)
    assert invited["token"].startswith("thi_")
    listed = json.loads(run_cli(["orgs", "invitations", org], env).stdout)["invitations"]
    assert [i["status"] for i in listed] == ["pending"]
    revoked = run_cli(["orgs", "revoke", org, invited["invitation"]["id"]], env)
    assert revoked.stdout.strip().endswith("revoked")
    last = run_cli(["orgs", "remove-member", org, boss["id"]], env)
    assert error_lines(last.stderr) == [
        "tollhouse: error: An organisation keeps at least one owner."
    ]
    assert run_cli(["orgs", "transfer", org, hand["id"]], env).returncode == 0
    mine = json.loads(run_cli(["orgs", "list", "--user", hand["id"]], env).stdout)
    assert [o["id"] for o in mine["organisations"]] == [org]
    assert run_cli(["orgs", "delete", org], env).returncode == 0
    shown = json.loads(run_cli(["orgs", "show", org], env).stdout)
    assert shown["deleted_at"] is not None
    bad = run_cli(["orgs", "show", "acme"], env)
    assert error_lines(bad.stderr) == ["tollhouse: error: 'acme' is not an organisation id"]
