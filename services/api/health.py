"""Liveness (the process answers) and readiness (broker, database and Temporal all answer)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from services.api.connections import ConnectionsDep
from shared.probes import channel_open, database_answers, readiness, temporal_serving
from shared.readiness import Readiness

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
    async def broker() -> str:
        return await channel_open((await connections.broker.get()).channel)

    async def temporal() -> str:
        return await temporal_serving(await connections.temporal.get())

    answer = await readiness(
        {"broker": broker, "database": lambda: database_answers(connections.engine), "temporal": temporal}
    )
    if not answer.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return answer
