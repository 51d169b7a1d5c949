"""The composition root: where the database is found, the pool opened and services wired.

Adapters (the HTTP API, the CLI, the admin pages) get a `Tollhouse` and call its services;
nothing else constructs services.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from tollhouse.db.embedded import EmbeddedPostgres
from tollhouse.db.pool import Database
from tollhouse.health import HealthService
from tollhouse.keys import ApiKeyService
from tollhouse.settings import Settings


class Tollhouse:
    """Every service, over one pool."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.keys = ApiKeyService(db)
        self.health = HealthService(db)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, dsn: str, *, min_size: int = 2, max_size: int = 10
    ) -> AsyncIterator[Tollhouse]:
        """Open a pool on `dsn`, yield the wired services, close the pool."""
        db = Database(dsn, min_size=min_size, max_size=max_size)
        await db.open()
        try:
            yield cls(db)
        finally:
            await db.close()


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The DSN to use: `DATABASE_URL`, or the embedded server, started for the duration."""
    if settings.database_url:
        yield settings.database_url
        return
    server = EmbeddedPostgres(settings.pgdata)
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()
