"""Service API keys: hashed storage, revocation, the race-safe bootstrap key."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from tollhouse.app import Tollhouse
from tollhouse.errors import ApiKeyNotFound, InvalidRequest
from tollhouse.keys.service import ApiKeyService, hash_key


async def test_create_then_authenticate(tollhouse: Tollhouse) -> None:
    created = await tollhouse.keys.create("worker")
    assert created.secret.startswith(f"th_{created.key.prefix}_")
    key = await tollhouse.keys.authenticate(created.secret)
    assert key is not None and key.id == created.key.id
    assert await tollhouse.keys.authenticate(created.secret + "x") is None
    assert await tollhouse.keys.authenticate("not-a-key") is None


async def test_only_a_hash_of_the_key_is_stored(dsn: str, tollhouse: Tollhouse) -> None:
    created = await tollhouse.keys.create("worker")
    # th_<8 hex>_<random>: the random part may itself hold "_", so cut after the prefix.
    secret_part = created.secret.split("_", 2)[2]
    assert len(secret_part) >= 40
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT key_hash, t::text FROM tollhouse.service_api_keys t WHERE id = %s",
            (created.key.id,),
        ).fetchone()
    assert row is not None
    assert bytes(row[0]) == hash_key(created.secret)
    assert secret_part not in row[1]


async def test_revoked_keys_stop_working_at_once(tollhouse: Tollhouse) -> None:
    created = await tollhouse.keys.create("worker")
    assert await tollhouse.keys.authenticate(created.secret) is not None  # now cached
    revoked = await tollhouse.keys.revoke("worker")
    assert revoked.revoked_at is not None
    assert await tollhouse.keys.authenticate(created.secret) is None
    assert [k.name for k in await tollhouse.keys.list()] == []
    assert [k.name for k in await tollhouse.keys.list(include_revoked=True)] == ["worker"]
    # The name is free again once its key is revoked.
    await tollhouse.keys.create("worker")


async def test_revocation_elsewhere_is_seen_after_the_cache_expires(
    tollhouse: Tollhouse,
) -> None:
    other_process = ApiKeyService(tollhouse.db, cache_seconds=0.0)
    created = await tollhouse.keys.create("worker")
    assert await other_process.authenticate(created.secret) is not None
    await tollhouse.keys.revoke(str(created.key.id))
    assert await other_process.authenticate(created.secret) is None


async def test_revoking_an_unknown_key_is_not_found(tollhouse: Tollhouse) -> None:
    with pytest.raises(ApiKeyNotFound):
        await tollhouse.keys.revoke("nobody")


async def test_invalid_names_are_refused_by_the_database(tollhouse: Tollhouse) -> None:
    with pytest.raises(InvalidRequest):
        await tollhouse.keys.create("")


async def test_authentication_stamps_last_use(tollhouse: Tollhouse) -> None:
    created = await tollhouse.keys.create("worker")
    assert created.key.last_used_at is None
    await tollhouse.keys.authenticate(created.secret)
    (key,) = await tollhouse.keys.list()
    assert key.last_used_at is not None


async def test_concurrent_starts_create_one_bootstrap_key(tollhouse: Tollhouse) -> None:
    results = await asyncio.gather(*(tollhouse.keys.create_bootstrap() for _ in range(10)))
    created = [r for r in results if r is not None]
    assert len(created) == 1
    assert [k.bootstrap for k in await tollhouse.keys.list()] == [True]
    assert await tollhouse.keys.create_bootstrap() is None


async def test_no_bootstrap_key_once_any_key_was_made(tollhouse: Tollhouse) -> None:
    await tollhouse.keys.create("made-by-hand")
    assert await tollhouse.keys.create_bootstrap() is None


async def test_revoking_by_id_never_touches_a_key_named_like_that_id(tollhouse: Tollhouse) -> None:
    target = await tollhouse.keys.create("target")
    await tollhouse.keys.create(str(target.key.id))  # a key whose name is the other's id
    await tollhouse.keys.revoke(str(target.key.id))
    assert [k.name for k in await tollhouse.keys.list()] == [str(target.key.id)]
