"""The HTTP API: a thin FastAPI adapter over the services of `tollhouse.app`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute

from tollhouse import __version__
from tollhouse.api import errors
from tollhouse.api.debit import PATH as DEBIT_PATH
from tollhouse.api.debit import DebitShortPath
from tollhouse.api.middleware import RequestMiddleware
from tollhouse.api.routes import auth, billing, credits, health, keys, me, orgs, users
from tollhouse.api.webhook import PATH as WEBHOOK_PATH
from tollhouse.api.webhook import WebhookShortPath
from tollhouse.app import Tollhouse
from tollhouse.observability import Metrics


def create_app(
    tollhouse: Tollhouse, *, webhook_short_path: bool = True, debit_short_path: bool = True
) -> FastAPI:
    """The ASGI app over already-opened services (the caller owns the pool's lifetime).

    `webhook_short_path=False` leaves Stripe deliveries to their FastAPI route, and
    `debit_short_path=False` every debit to its route; they answer the same (the tests
    compare both paths)."""
    app = FastAPI(
        title="Tollhouse",
        version=__version__,
        description="Users, identities, billing and credits for a SaaS or AI product.",
    )
    app.state.tollhouse = tollhouse
    receiver = tollhouse.billing.receiver
    app.state.metrics = Metrics(
        tollhouse.db.stats,
        webhook_batches=lambda: (receiver.batches, receiver.requests),
        lanes_stats=tollhouse.db.lanes_stats,
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(keys.router)
    app.include_router(users.router)
    app.include_router(auth.router)
    app.include_router(me.router)
    app.include_router(credits.router)
    app.include_router(orgs.router)
    app.include_router(billing.router)
    if webhook_short_path:
        app.add_middleware(
            WebhookShortPath,
            tollhouse=tollhouse,
            metrics=app.state.metrics,
            route=_route(billing.router, WEBHOOK_PATH),
        )
    if debit_short_path:
        app.add_middleware(
            DebitShortPath, tollhouse=tollhouse, route=_route(credits.router, DEBIT_PATH)
        )
    # Added last, so outermost: it also wraps both short paths.
    app.add_middleware(
        RequestMiddleware, metrics=app.state.metrics, own_body_bounds=frozenset({WEBHOOK_PATH})
    )
    return app


def _route(router: APIRouter, path: str) -> BaseRoute:
    """The one route of `router` at `path`: a short path labels its requests with it."""
    (route,) = [r for r in router.routes if getattr(r, "path", "") == path]
    return route


__all__ = ["create_app"]
