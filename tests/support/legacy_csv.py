"""Legacy users.csv files (seed 001's format), generated: valid rows, plus helpers to
write hazards (bad bytes, broken quotes, odd values) into them."""

from __future__ import annotations

import csv
import io
import random
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from tollhouse.imports.parse import COLUMNS

TIERS = ("free", "free", "free", "starter", "pro", "enterprise")


def legacy_row(i: int, rng: random.Random) -> dict[str, str]:
    """A valid legacy record number `i` (0-based), deterministic for a given rng state."""
    provider = ("google", "apple", "email")[i % 3]
    tier = TIERS[i % len(TIERS)]
    paid = tier != "free"
    subscribed = paid and i % 2 == 0
    total = {"free": 100, "starter": 1000, "pro": 5000, "enterprise": 20000}[tier]
    balance = rng.randrange(0, total + 1)
    day = 1 + i % 28
    return {
        "user_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "email": f"User{i}@Example{i % 97}.com",
        "auth_provider": provider,
        "provider_user_id": "" if provider == "email" else f"{provider}-{i:09d}",
        "display_name": f"User, number {i}" if i % 5 == 0 else f"User {i}",
        "created_at": f"2023-{1 + i % 12:02d}-{day:02d}T10:{i % 60:02d}:00Z",
        "last_login_at": f"2024-{1 + i % 12:02d}-{day:02d}T08:00:00+02:00",
        "plan_tier": tier,
        "credits_total": str(total),
        "credits_remaining": str(balance),
        "credits_balance": str(balance),
        "daily_credit_limit": "25" if tier == "free" else "",
        "credits_last_reset": f"2024-06-{day:02d}T00:00:00Z",
        "monthly_reset_at": f"2030-07-{day:02d}T00:00:00Z",
        "newsletter_opt_in": ("true", "false", "")[i % 3],
        "account_status": "suspended" if i % 50 == 0 else "active",
        "stripe_customer_id": f"cus_{i:010d}" if paid else "",
        "stripe_subscription_id": f"sub_{i:010d}" if subscribed else "",
        "billing_status": ("active", "past_due", "canceled")[i % 3] if subscribed else "",
    }


def legacy_rows(count: int, seed: int = 7) -> Iterator[dict[str, str]]:
    rng = random.Random(seed)
    for i in range(count):
        yield legacy_row(i, rng)


def render(
    rows: Sequence[dict[str, str]] | Iterator[dict[str, str]],
    columns: Sequence[str] = COLUMNS,
    newline: str = "\r\n",
) -> str:
    """The CSV text of rows (RFC 4180 quoting)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=newline)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(c, "") for c in columns])
    return out.getvalue()


def write_legacy_csv(path: Path, count: int, seed: int = 7, newline: str = "\r\n") -> Path:
    """A file of `count` valid records, written in constant memory."""
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator=newline)
        writer.writerow(COLUMNS)
        for row in legacy_rows(count, seed):
            writer.writerow([row[c] for c in COLUMNS])
    return path
