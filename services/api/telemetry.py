"""The gateway's metrics: its HTTP requests, the admission backlog, and `GET /metrics` that
serves them with the rest of the process's registry."""

from __future__ import annotations

import time

import structlog
from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.connections import ConnectionsDep
from shared.admission_table import AdmissionStatus
from shared.db import Admission

METRICS_PATH = "/metrics"
# scrapes and probes come every few seconds and say nothing about orders: not traced
UNTRACED_PATHS = frozenset({METRICS_PATH, "/healthz", "/readyz"})
UNMATCHED_ROUTE = "unmatched"  # any path no route takes, so scanners cannot multiply the series

HTTP_REQUESTS = Counter(
    "orderflow_http_requests",
    "HTTP requests answered, by route template, method and status",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "orderflow_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template and method",
    ["method", "route"],
)

log = structlog.get_logger(__name__)
router = APIRouter()


class HttpMetrics:
    """ASGI middleware: counts and times every request under its route's template."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_noting_status)
        finally:
            # the router has put the matched route into the scope by now
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_REQUEST_DURATION.labels(scope["method"], route).observe(time.perf_counter() - started)


# the admission backlog's gauges, counted in the `admissions` table across all bridges at each scrape
BACKLOG_GAUGES: tuple[tuple[str, str, frozenset[AdmissionStatus]], ...] = (
    (
        "orderflow_admission_placements_waiting",
        "Placements registered by a bridge and waiting for a slot (more may wait in the broker)",
        frozenset({AdmissionStatus.WAITING}),
    ),
    (
        "orderflow_admission_lifecycles_running",
        "Lifecycles holding a slot (running or being started), at most ORDERFLOW_MAX_RUNNING_LIFECYCLES",
        frozenset(status for status in AdmissionStatus if status.holds_slot),
    ),
    (
        "orderflow_admission_lifecycles_in_review",
        "Lifecycles waiting for their reviewer, holding no slot meanwhile",
        frozenset({AdmissionStatus.REVIEWING}),
    ),
    (
        "orderflow_admission_approved_waiting",
        "Approved orders waiting for a slot to go on (the next freed, before any placement)",
        frozenset({AdmissionStatus.RESUMING}),
    ),
)
BACKLOG_STATUSES = [status.value for _, _, statuses in BACKLOG_GAUGES for status in statuses]
BACKLOG_QUERY = (
    select(col(Admission.status), func.count())
    .where(col(Admission.status).in_(BACKLOG_STATUSES))
    .group_by(col(Admission.status))
)


async def admission_counts(session: AsyncSession) -> dict[AdmissionStatus, int]:
    """How many admissions are in each status the backlog gauges count (absent: none)."""
    return {AdmissionStatus(status): count for status, count in await session.execute(BACKLOG_QUERY)}


@router.get(METRICS_PATH, include_in_schema=False)
async def metrics(connections: ConnectionsDep) -> Response:
    """The process's metrics in Prometheus' text format, the admission backlog read just now."""
    backlog = CollectorRegistry()
    try:
        async with connections.sessions() as session:
            counts = await admission_counts(session)
    except Exception as error:  # noqa: BLE001 (a scrape answers without the backlog rather than fail)
        log.warning("admission backlog unavailable", error=repr(error))
    else:
        for name, documentation, statuses in BACKLOG_GAUGES:
            value = sum(counts.get(status, 0) for status in statuses)
            Gauge(name, documentation, registry=backlog).set(value)
    return Response(generate_latest(REGISTRY) + generate_latest(backlog), media_type=CONTENT_TYPE_LATEST)
