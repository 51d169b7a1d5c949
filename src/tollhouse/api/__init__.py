"""The HTTP API: a thin FastAPI adapter over the services of `tollhouse.app`."""

from __future__ import annotations

from fastapi import FastAPI

from tollhouse import __version__
from tollhouse.api import errors
from tollhouse.api.middleware import RequestMiddleware
from tollhouse.api.routes import auth, billing, credits, health, keys, me, orgs, users
from tollhouse.app import Tollhouse
from tollhouse.observability import Metrics


def create_app(tollhouse: Tollhouse) -> FastAPI:
    """The ASGI app over already-opened services (the caller owns the pool's lifetime)."""
    app = FastAPI(
        title="Tollhouse",
        version=__version__,
        description="Users, identities, billing and credits for a SaaS or AI product.",
    )
    app.state.tollhouse = tollhouse
    app.state.metrics = Metrics(tollhouse.db.stats)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(keys.router)
    app.include_router(users.router)
    app.include_router(auth.router)
    app.include_router(me.router)
    app.include_router(credits.router)
    app.include_router(orgs.router)
    app.include_router(billing.router)
    app.add_middleware(RequestMiddleware, metrics=app.state.metrics)
    return app


__all__ = ["create_app"]
