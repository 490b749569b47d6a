"""Liveness (the process answers) and readiness (broker, database and Temporal all answer)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from services.api.connections import Connections
from services.api.dependencies import ConnectionsDep
from shared.probes import Readiness, channel_open, database_answers, readiness, temporal_serving

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: broker, database and Temporal answer",
    responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": Readiness, "description": "Not ready."}},
)
async def readyz(connections: ConnectionsDep, response: Response) -> Readiness:
    answer = await readiness(
        {
            "broker": lambda: check_broker(connections),
            "database": lambda: database_answers(connections.engine),
            "temporal": lambda: check_temporal(connections),
        }
    )
    if not answer.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return answer


async def check_broker(connections: Connections) -> str:
    return await channel_open((await connections.broker.get()).channel)


async def check_temporal(connections: Connections) -> str:
    return await temporal_serving(await connections.temporal.get())
