"""The live dashboard (`/dashboard`: a page, script and style sheet from `static/`), open as it holds no
data, and its figures (`GET /stats`); the page uses the public API with the bearer token it signs in with."""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, select, text
from sqlmodel import col

from services.api.auth import AUTH_RESPONSES, Overseer
from services.api.connections import SessionDep
from services.api.schemas import AdmissionLoad, MinuteCount, Stats
from services.api.streams import newest_position
from services.api.telemetry import admission_counts
from shared.admission_table import AdmissionStatus
from shared.contracts import OrderState
from shared.db import Order
from shared.lifecycle import order_workflow_id
from shared.settings import Settings
from shared.temporal import connect_config

STATIC_DIR = Path(__file__).parent / "static"
DASHBOARD_PAGE = (STATIC_DIR / "dashboard.html").read_text()
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")  # `{{name}}` in the page: a value from the settings
# its own script and style sheet only, requests to this gateway only, never in a frame, no form
# that submits anywhere: an injected script or a clickjacking page gets nowhere
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
THROUGHPUT_MINUTES = 10

router = APIRouter()
router.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")


@router.get("/dashboard", include_in_schema=False)
async def dashboard(request: Request) -> HTMLResponse:
    """The page, told the claim holding the roles (it shows them; the gateway decides) and workflow URL."""
    settings: Settings = request.app.state.settings
    values = {"roles_claim": settings.auth_roles_claim, "workflow_url": workflow_url_template(settings)}
    page = PLACEHOLDER.sub(lambda found: html.escape(values[found[1]]), DASHBOARD_PAGE)
    return HTMLResponse(page, headers=PAGE_HEADERS)


def workflow_url_template(settings: Settings) -> str:
    """An order's workflow in the Temporal UI, `{order_id}` standing for the id (the page fills it in)."""
    namespace = quote(connect_config(settings).get("namespace", settings.temporal_namespace), safe="")
    workflow_id = order_workflow_id("{order_id}")
    return f"{settings.temporal_ui_url.rstrip('/')}/namespaces/{namespace}/workflows/{workflow_id}"


@router.get(
    "/stats",
    tags=["orders"],
    summary="Orders per state, admission load and throughput",
    description="From the orders and admissions tables, read at one instant; `position` says which "
    "events they include. For reviewers and operators.",
    responses=AUTH_RESPONSES,
)
async def stats(_: Overseer, request: Request, session: SessionDep) -> Stats:
    # one snapshot: the figures and `position` agree
    await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    counted = await session.execute(select(col(Order.state), func.count()).group_by(col(Order.state)))
    counts = dict.fromkeys(OrderState, 0) | {OrderState(state): count for state, count in counted}
    admissions = await admission_counts(session)
    return Stats(
        counts=counts,
        total=sum(counts.values()),
        admission=AdmissionLoad(
            backlog=admissions.get(AdmissionStatus.WAITING, 0),
            running=sum(count for status, count in admissions.items() if status.holds_slot),
            max_running=request.app.state.settings.max_running_lifecycles,
        ),
        completed_per_minute=[
            MinuteCount(minute=minute, count=count)
            for minute, count in await session.execute(COMPLETED_PER_MINUTE)
        ],
        position=await newest_position(session),
    )


# a completed order's `updated_at` is its `completed` event's time (the projection's last change)
COMPLETED_PER_MINUTE = text(
    """
    SELECT minute, count(orders.id)
    FROM generate_series(date_trunc('minute', now()) - make_interval(mins => :minutes - 1),
                         date_trunc('minute', now()), interval '1 minute') AS minute
    LEFT JOIN orders ON orders.state = :completed AND date_trunc('minute', orders.updated_at) = minute
    GROUP BY minute ORDER BY minute
    """
).bindparams(minutes=THROUGHPUT_MINUTES, completed=OrderState.COMPLETED.value)
