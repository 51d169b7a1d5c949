"""The composition root: where the database is found, the pool opened and services wired.

Adapters (the HTTP API, the CLI, the admin pages) get a `Tollhouse` and call its services;
nothing else constructs services.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from tollhouse.billing import BillingConfig, BillingService
from tollhouse.credits import CreditService, conservation_problems
from tollhouse.db.dsn import as_user
from tollhouse.db.embedded import EmbeddedPostgres
from tollhouse.db.pool import Conn, Database
from tollhouse.db.roles import SERVICE_ROLE
from tollhouse.health import Check, HealthService
from tollhouse.identity import (
    AuthService,
    IdentityConfig,
    IdentityHooks,
    SelfService,
    User,
    UserService,
)
from tollhouse.imports import ImportService
from tollhouse.keys import ApiKeyService
from tollhouse.orgs import OrgService
from tollhouse.settings import Settings


class Tollhouse:
    """Every service, over one pool."""

    def __init__(
        self,
        db: Database,
        identity: IdentityConfig | None = None,
        hooks: IdentityHooks | None = None,
        credit_lanes: int = 2,
        billing: BillingConfig | None = None,
    ) -> None:
        self.db = db
        self.keys = ApiKeyService(db)
        self.health = HealthService(db, [credits_conservation])
        self.credits = CreditService(db, lanes=credit_lanes)
        self.users = UserService(db, hooks)
        self.me = SelfService(db)
        self.orgs = OrgService(db)
        self.auth = AuthService(db, identity, hooks)
        self.billing = BillingService(db, billing)
        self.imports = ImportService(db)

    async def update_user(self, user_id: uuid.UUID, changes: Mapping[str, Any]) -> User:
        """Change a user; a new `plan_override` moves its personal account to the new
        effective plan at once, keeping the period's usage."""
        user = await self.users.update(user_id, changes)
        if "plan_override" in changes:
            await self.credits.change_plan(user.effective_plan, user_id=user_id)
        return user

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        identity: IdentityConfig | None = None,
        hooks: IdentityHooks | None = None,
        credit_lanes: int = 2,
        billing: BillingConfig | None = None,
    ) -> AsyncIterator[Tollhouse]:
        """Open a pool on `dsn`, yield the wired services, close the pool."""
        db = Database(dsn, min_size=min_size, max_size=max_size)
        await db.open()
        try:
            services = cls(db, identity, hooks, credit_lanes, billing)
            try:
                yield services
            finally:
                await services.billing.close()
                await services.credits.close()
                await services.auth.close()
        finally:
            await db.close()


async def credits_conservation(conn: Conn) -> Check:
    """Doctor: every account's balance equals its ledger and its live grants."""
    problems = await conservation_problems(conn)
    if problems:
        return Check("credits", False, "; ".join(problems[:5]))
    return Check("credits", True, "every balance equals its ledger and its grants")


def _ids(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def identity_config(settings: Settings) -> IdentityConfig:
    """The identity part of the settings."""
    return IdentityConfig(
        password_profile=settings.password_hash_profile,
        password_concurrency=settings.password_hash_concurrency,
        session_ttl_seconds=settings.session_ttl_seconds,
        signin_limit=settings.signin_limit,
        signin_window_seconds=settings.signin_window_seconds,
        google_client_ids=_ids(settings.google_client_ids),
        apple_client_ids=_ids(settings.apple_client_ids),
        link_nonce_required=settings.link_nonce_required,
        google_jwks_url=settings.google_jwks_url,
        apple_jwks_url=settings.apple_jwks_url,
    )


def billing_config(settings: Settings) -> BillingConfig:
    """The Stripe part of the settings."""
    key = settings.stripe_api_key or None
    livemode = settings.stripe_livemode
    if livemode is None and key:  # the key's own mode
        if key.startswith(("sk_live_", "rk_live_")):
            livemode = True
        elif key.startswith(("sk_test_", "rk_test_")):
            livemode = False
    return BillingConfig(
        webhook_secrets=tuple(sorted(_ids(settings.stripe_webhook_secret))),
        api_key=key,
        api_base=settings.stripe_api_base or None,
        livemode=livemode,
        connect_accounts=tuple(sorted(_ids(settings.stripe_connect_accounts))),
        lanes=settings.stripe_webhook_lanes,
    )


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The DSN to use: `DATABASE_URL`, or the embedded server, started for the duration."""
    if settings.database_url:
        yield settings.database_url
        return
    server = EmbeddedPostgres(settings.pgdata)
    try:
        yield server.start()
    finally:
        server.stop()  # also after a start that failed half-way


def runtime_url(settings: Settings, owner_dsn: str) -> str:
    """The DSN the running service uses: a login of `tollhouse_service` where there is one
    (the embedded server, or TOLLHOUSE_SERVICE_DATABASE_URL), else the owner's DSN, whose
    connections then switch to that role."""
    if settings.service_database_url:
        return settings.service_database_url
    if settings.embedded:
        return as_user(owner_dsn, SERVICE_ROLE)
    return owner_dsn
