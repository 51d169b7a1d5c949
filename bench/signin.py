"""Sign-in throughput on this machine: password (bounded by Argon2) and Google ID tokens.

Run: python bench/signin.py [--seconds 10] [--concurrency 16]

Starts a throwaway embedded PostgreSQL (or uses DATABASE_URL), migrates it, creates users,
then for each case runs N concurrent tasks for a fixed time and prints sign-ins per second
with p50/p99 latency. Each sign-in is complete: throttle check, lookup, verification,
session row, user read. ID tokens are RS256, verified against a JWKS served on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.idp import GOOGLE_CLIENT, KeySet, claims, serve_jwks, sign

from loadgen import Stats, load
from tollhouse.app import Tollhouse
from tollhouse.db import migrate
from tollhouse.db.dsn import as_user
from tollhouse.db.embedded import EmbeddedPostgres
from tollhouse.identity import IdentityConfig

PASSWORD = "correct horse battery staple"
USERS = 50


async def run(dsn: str, service_dsn: str, seconds: float, concurrency: int) -> None:
    await migrate.migrate(dsn)
    keys = KeySet()
    with serve_jwks(keys) as jwks_url:
        rows: list[tuple[str, Stats]] = []
        for profile in ("rfc9106-low-memory", "owasp-minimum"):
            config = IdentityConfig(
                password_profile=profile,
                password_concurrency=os.cpu_count() or 2,
                google_client_ids=frozenset({GOOGLE_CLIENT}),
                google_jwks_url=jwks_url,
                signin_limit=10**9,
            )
            async with Tollhouse.open(service_dsn, min_size=4, max_size=8, identity=config) as th:
                prefix = profile.split("-")[0]
                for i in range(USERS):
                    await th.auth.sign_up(f"{prefix}{i}@bench.example", PASSWORD)

                async def password(n: int, prefix: str = prefix) -> object:
                    return await th.auth.sign_in_password(
                        f"{prefix}{n % USERS}@bench.example", PASSWORD, f"10.0.{n % 250}.1"
                    )

                async def wrong(n: int, prefix: str = prefix) -> object:
                    try:
                        await th.auth.sign_in_password(
                            f"{prefix}{n % USERS}@bench.example", "wrong password", "10.1.0.1"
                        )
                    except Exception as exc:
                        return exc
                    return None

                async def unknown(n: int) -> object:
                    try:
                        await th.auth.sign_in_password(
                            f"nobody{n}@bench.example", "wrong password", "10.2.0.1"
                        )
                    except Exception as exc:
                        return exc
                    return None

                label = f"password, argon2 {profile}"
                rows.append((label, await load(password, seconds, concurrency)))
                rows.append((f"  wrong password ({profile})", await load(wrong, seconds / 2, 4)))
                rows.append((f"  unknown e-mail ({profile})", await load(unknown, seconds / 2, 4)))
                if profile == "owasp-minimum":
                    tokens = [sign(keys, claims("google", f"bench-{i}")) for i in range(200)]
                    for token in tokens:
                        await th.auth.sign_in_oidc("google", token)

                    async def google(n: int, tokens: list[str] = tokens) -> object:
                        return await th.auth.sign_in_oidc("google", tokens[n % len(tokens)])

                    rows.append(
                        (
                            "google ID token (RS256, known user)",
                            await load(google, seconds, concurrency),
                        )
                    )
    print(f"{'case':44} {'sign-ins/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'n':>7}")
    for name, (rate, p50, p99, count) in rows:
        print(f"{name:44} {rate:10.1f} {p50:8.1f} {p99:8.1f} {count:7d}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {args.concurrency} concurrent tasks, {args.seconds}s per case")
    external = os.environ.get("DATABASE_URL")
    if external:
        asyncio.run(run(external, external, args.seconds, args.concurrency))
        return
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="tollhouse-bench-")) / "pgdata")
    dsn = server.start()
    try:
        asyncio.run(run(dsn, as_user(dsn, "tollhouse_service"), args.seconds, args.concurrency))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
