"""Run `tollhouse` as a user would: the installed console script, in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

TOLLHOUSE = str(Path(sys.executable).with_name("tollhouse"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh user: no DATABASE_URL, no .env, a private data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLHOUSE_")}
    env.pop("DATABASE_URL", None)
    env["TOLLHOUSE_DATA_DIR"] = str(tmp_path / "data")
    env["TOLLHOUSE_ENV_FILE"] = str(tmp_path / ".env")
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOLLHOUSE, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    """The human error lines of a failed command (JSON log lines aside)."""
    return [line for line in stderr.splitlines() if line.startswith("tollhouse: error:")]


@dataclass
class Service:
    """A running `tollhouse serve`."""

    process: subprocess.Popen[str]
    port: int
    log_path: Path
    started: float
    ready_after: float = 0.0
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}: {self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    self.ready_after = time.monotonic() - self.started
                    return self.ready_after
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready within {timeout}s: {self.logs()}")

    def stop(self, sig: int, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        assert self.process.stdout is not None
        self.output.append(self.process.stdout.read())
        self.process.stdout.close()
        return code

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stdout(self) -> str:
        return "".join(self.output)


def start_service(env: Mapping[str, str], tmp_path: Path, *args: str) -> Service:
    port = free_port()
    log_path = tmp_path / f"serve-{port}.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [TOLLHOUSE, "serve", "--port", str(port), *args],
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    return Service(process, port, log_path, time.monotonic())


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services started by a test; any still running at the end are killed."""
    started: list[Service] = []
    yield started
    for service in started:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait(10)
        if service.process.stdout is not None:
            service.process.stdout.close()
