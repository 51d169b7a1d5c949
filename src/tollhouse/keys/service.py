"""Create, list, revoke and check service API keys.

A key reads `th_<8-char prefix>_<secret>`. The whole key is 256 bits of randomness plus
the prefix; only its SHA-256 is stored, so a leaked database does not leak keys. The
prefix lets an operator tell keys apart in `keys list`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row

from tollhouse.db.pool import Database
from tollhouse.db.queries import Queries
from tollhouse.errors import ApiKeyNameTaken, ApiKeyNotFound, InvalidRequest
from tollhouse.ids import uuid7

_queries = Queries("tollhouse.keys", "queries.sql")
KEY_PREFIX = "th_"
BOOTSTRAP_NAME = "bootstrap"
_CONSTRAINTS = {
    "service_api_keys_active_name_key": ApiKeyNameTaken,
    "service_api_keys_name_check": InvalidRequest,
}


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret."""

    id: uuid.UUID
    name: str
    prefix: str
    bootstrap: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class CreatedApiKey:
    """A key just created: the only time its secret exists outside the caller."""

    key: ApiKey
    secret: str


def hash_key(secret: str) -> bytes:
    """The SHA-256 stored for a key."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _new_secret() -> tuple[str, str]:
    prefix = secrets.token_hex(4)
    return prefix, f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"


class ApiKeyService:
    """Service API keys, with a short in-process cache on the authentication path.

    A key revoked through this process stops working at once; one revoked elsewhere
    stops working within `cache_seconds`.
    """

    def __init__(self, db: Database, *, cache_seconds: float = 10.0) -> None:
        self._db = db
        self._cache_seconds = cache_seconds
        self._cache: dict[bytes, tuple[float, ApiKey]] = {}

    async def create(self, name: str) -> CreatedApiKey:
        """A new key named `name` (unique among active keys)."""
        prefix, secret = _new_secret()
        params = {"id": uuid7(), "name": name, "prefix": prefix, "key_hash": hash_key(secret)}
        key = await self._insert("create", params)
        assert key is not None
        return CreatedApiKey(key, secret)

    async def create_bootstrap(self) -> CreatedApiKey | None:
        """A first key when none was ever created, else None (safe under races)."""
        prefix, secret = _new_secret()
        params = {
            "id": uuid7(),
            "name": BOOTSTRAP_NAME,
            "prefix": prefix,
            "key_hash": hash_key(secret),
        }
        key = await self._insert("create_bootstrap", params)
        return None if key is None else CreatedApiKey(key, secret)

    async def _insert(self, query: str, params: dict[str, Any]) -> ApiKey | None:
        async with self._db.connection(_CONSTRAINTS) as conn:
            cur = conn.cursor(row_factory=class_row(ApiKey))
            await cur.execute(_queries[query], params)
            return await cur.fetchone()

    async def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        """Keys in creation order."""
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(ApiKey))
            await cur.execute(_queries["list"], {"include_revoked": include_revoked})
            return await cur.fetchall()

    async def revoke(self, id_or_name: str) -> ApiKey:
        """Revoke the key with this id, or the active key with this name."""
        try:
            key_id: uuid.UUID | None = uuid.UUID(id_or_name)
        except ValueError:
            key_id = None
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(ApiKey))
            await cur.execute(_queries["revoke"], {"id": key_id, "name": id_or_name})
            key = await cur.fetchone()
        if key is None:
            raise ApiKeyNotFound(f"no service API key {id_or_name!r}", key=id_or_name)
        self._cache = {h: v for h, v in self._cache.items() if v[1].id != key.id}
        return key

    async def authenticate(self, secret: str) -> ApiKey | None:
        """The active key matching `secret`, or None."""
        if not secret.startswith(KEY_PREFIX) or len(secret) > 200:
            return None
        digest = hash_key(secret)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(ApiKey))
            await cur.execute(_queries["authenticate"], {"key_hash": digest})
            key = await cur.fetchone()
        if key is None:
            self._cache.pop(digest, None)
            return None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self._cache_seconds, key)
        return key
