"""Liveness (the process answers) and readiness (broker, database and Temporal all answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

from fastapi import APIRouter, Response, status
from sqlalchemy import text

from services.api.connections import Connections, DependencyUnavailable, describe
from services.api.dependencies import ConnectionsDep
from services.api.schemas import DependencyCheck, Readiness

CHECK_TIMEOUT_SECONDS = 3.0

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
    checks: dict[str, Callable[[Connections], Awaitable[str]]] = {
        "broker": check_broker,
        "database": check_database,
        "temporal": check_temporal,
    }
    results = await asyncio.gather(*(run_check(check, connections) for check in checks.values()))
    by_name = dict(zip(checks, results, strict=True))
    failed = [name for name, result in by_name.items() if not result.ok]
    if failed:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(ready=not failed, checks=by_name, failed=failed)


async def run_check(
    check: Callable[[Connections], Awaitable[str]], connections: Connections
) -> DependencyCheck:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            return DependencyCheck(ok=True, detail=await check(connections))
    except DependencyUnavailable as error:
        return DependencyCheck(ok=False, detail=error.reason)
    # a readiness check reports every failure rather than raising it
    except Exception as error:  # noqa: BLE001
        return DependencyCheck(ok=False, detail=describe(error))


async def check_broker(connections: Connections) -> str:
    link = await connections.broker.get()
    if link.channel.is_closed:
        raise DependencyUnavailable("broker", "the channel is closed (reconnecting)")
    return "channel open"


async def check_database(connections: Connections) -> str:
    async with connections.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    return "SELECT 1 answered"


async def check_temporal(connections: Connections) -> str:
    client = await connections.temporal.get()
    timeout = timedelta(seconds=CHECK_TIMEOUT_SECONDS)
    if not await client.service_client.check_health(timeout=timeout):
        raise DependencyUnavailable("temporal", "the workflow service is not serving")
    return "workflow service serving"
