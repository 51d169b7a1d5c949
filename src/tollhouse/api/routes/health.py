"""Liveness, readiness and metrics: unauthenticated, for load balancers and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from tollhouse.api.deps import TollhouseDep
from tollhouse.api.errors import envelope

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: str


class ReadinessOut(BaseModel):
    status: str
    database: bool
    migrations: bool


# GET and HEAD (some load balancers probe with HEAD), each a route of its own so that each
# has its own operation id.
@router.get("/healthz", response_model=Liveness, summary="The process is alive")
@router.head("/healthz", response_model=Liveness, summary="The process is alive")
async def healthz() -> Liveness:
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=ReadinessOut,
    summary="The database answers and its migrations are current",
    responses={503: {"description": "Not ready; the error envelope says why"}},
)
@router.head(
    "/readyz",
    response_model=ReadinessOut,
    summary="The database answers and its migrations are current",
    responses={503: {"description": "Not ready; the error envelope says why"}},
)
async def readyz(tollhouse: TollhouseDep) -> ReadinessOut | JSONResponse:
    readiness = await tollhouse.health.readiness()
    if not readiness.ready:
        return JSONResponse(
            envelope(
                "not_ready",
                readiness.detail,
                database=readiness.database,
                migrations=readiness.migrations,
            ),
            status_code=503,
        )
    return ReadinessOut(status="ok", database=True, migrations=True)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
