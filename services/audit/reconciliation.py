"""Reconciliation of the read model: a recent order's row that committed after its events were
projected (they found no row) is projected again from all its events, and counted."""

from __future__ import annotations

from datetime import timedelta

import structlog
from prometheus_client import Counter
from sqlalchemy import bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from services.audit.projection import STATE_OF_EVENT, project
from shared.contracts import RecordedEvent
from shared.db import AuditEvent, transaction

RECONCILE_EVERY_SECONDS = 60.0
RECONCILE_WINDOW = timedelta(hours=1)
MAX_REPAIRS = 100

REPAIRS = Counter(
    "orderflow_read_model_repairs",
    "Orders whose read-model row was behind their recorded events, projected again",
)

STATE_TYPES = [event_type.value for event_type in STATE_OF_EVENT]
# a recorded state-changing event the row has not taken; seq > 0 as the (order_id, seq) index has it
BEHIND_ITS_EVENTS = """
    EXISTS (
        SELECT FROM order_events AS event
        WHERE event.order_id = orders.id AND event.seq > 0 AND event.seq > orders.last_event_seq
            AND event.type = ANY(CAST(:state_types AS text[]))
    )
"""
# the newest orders first, by the `created_at` index
RECENT_BEHIND = text(
    f"""
    SELECT id FROM orders
    WHERE created_at > now() - CAST(:window AS interval) AND {BEHIND_ITS_EVENTS}
    ORDER BY created_at DESC LIMIT :limit
    """
)
LOCK_IF_BEHIND = text(f"SELECT id FROM orders WHERE id = :order_id AND {BEHIND_ITS_EVENTS} FOR UPDATE")
EVENTS_OF_ORDER = select(AuditEvent).where(
    col(AuditEvent.order_id) == bindparam("order_id"), col(AuditEvent.seq) > 0
)

log = structlog.get_logger(__name__)


async def repair_rows_behind(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    """Project again the recent orders whose rows are behind their events: their ids."""
    async with sessions() as session:
        behind = list(
            await session.scalars(
                RECENT_BEHIND, {"window": RECONCILE_WINDOW, "limit": MAX_REPAIRS, "state_types": STATE_TYPES}
            )
        )
    repaired: list[str] = []
    for order_id in behind:
        try:
            if await repair(sessions, order_id):
                repaired.append(order_id)
        except Exception as error:  # noqa: BLE001 (one order's trouble must not keep the others behind)
            log.warning("could not repair the order's row", order_id=order_id, error=repr(error))
    return repaired


async def repair(sessions: async_sessionmaker[AsyncSession], order_id: str) -> bool:
    """Project all of the order's events if its row, locked first, is still behind them."""
    async with transaction(sessions) as session:
        if await session.scalar(LOCK_IF_BEHIND, {"order_id": order_id, "state_types": STATE_TYPES}) is None:
            return False
        stored = await session.scalars(EVENTS_OF_ORDER, {"order_id": order_id})
        await project(session, [RecordedEvent.model_validate(row, from_attributes=True) for row in stored])
    REPAIRS.inc()
    log.warning("read model row repaired", order_id=order_id)
    return True
