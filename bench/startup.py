"""Time from `tollhouse serve` to a 200 on /readyz, and the service's memory at idle.

Run: python bench/startup.py [--runs 3]

Each run starts `tollhouse serve` on the embedded database in a new data dir (cold: initdb,
start, migrate, first key) and then again in the same dir (warm), polls /readyz every
20 ms, waits 5 s at idle and reads the resident memory of the serve process and of the
embedded PostgreSQL's processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from loadgen import free_port

TOLLHOUSE = str(Path(sys.executable).with_name("tollhouse"))


def start_and_wait(data_dir: Path) -> tuple[subprocess.Popen[bytes], float, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLHOUSE_")}
    env.pop("DATABASE_URL", None)
    env["TOLLHOUSE_DATA_DIR"] = str(data_dir)
    started = time.perf_counter()
    process = subprocess.Popen(
        [TOLLHOUSE, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return process, time.perf_counter() - started, port
        except OSError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"serve exited with {process.returncode}")
        time.sleep(0.02)


def postgres_rss(data_dir: Path) -> int:
    total = 0
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "postgres":
                parent = proc if str(data_dir) in " ".join(proc.info["cmdline"] or []) else None
                if parent is None:
                    ppid = psutil.Process(proc.ppid())
                    if str(data_dir) in " ".join(ppid.cmdline()):
                        parent = ppid
                if parent is not None:
                    total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cold, warm, serve_rss, pg_rss = [], [], [], []
    for _ in range(args.runs):
        data_dir = Path(tempfile.mkdtemp(prefix="tollhouse-bench-")) / "data"
        process, seconds, _ = start_and_wait(data_dir)
        cold.append(seconds)
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        process, seconds, _ = start_and_wait(data_dir)
        warm.append(seconds)
        time.sleep(5)
        serve_rss.append(psutil.Process(process.pid).memory_info().rss)
        pg_rss.append(postgres_rss(data_dir / "pgdata"))
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    mib = 1024 * 1024
    median = statistics.median
    print(f"runs: {args.runs}")
    print(f"cold start to ready (new data dir): median {median(cold):.2f} s, max {max(cold):.2f} s")
    print(
        f"warm start to ready (same data dir): median {median(warm):.2f} s, max {max(warm):.2f} s"
    )
    print(f"tollhouse serve RSS at idle: median {median(serve_rss) / mib:.0f} MiB")
    print(f"embedded PostgreSQL RSS at idle, all processes: median {median(pg_rss) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
