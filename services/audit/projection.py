"""The audit table and the `orders` read model, written from one event in one transaction.

Events may arrive twice or out of order. The audit row is unique on `event_id` and on
`(order_id, seq)`, so a repeat inserts nothing and projects nothing. The projection never moves an
order back: `state` comes from the newest state-changing event (`last_event_seq` is that event's
seq), and `address` and `tracking_number` from the newest event of the type that carries them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.contracts import EventType, OrderEvent, OrderState
from shared.db import AuditEvent, Order

STATE_OF_EVENT: dict[EventType, OrderState] = {
    EventType.QUEUED: OrderState.QUEUED,
    EventType.ADMITTED: OrderState.RECEIVED,
    EventType.RECEIVED: OrderState.RECEIVED,
    EventType.VALIDATED: OrderState.VALIDATED,
    EventType.AWAITING_APPROVAL: OrderState.AWAITING_APPROVAL,
    EventType.APPROVED: OrderState.APPROVED,
    EventType.PAYMENT_CHARGED: OrderState.PAID,
    EventType.SHIPPING_STARTED: OrderState.SHIPPING,
    EventType.PACKAGE_PREPARED: OrderState.SHIPPING,
    EventType.CARRIER_DISPATCHED: OrderState.SHIPPING,
    EventType.DISPATCH_FAILED: OrderState.SHIPPING,
    EventType.SHIPPED: OrderState.SHIPPED,
    EventType.COMPLETED: OrderState.COMPLETED,
    EventType.CANCELLED: OrderState.CANCELLED,
    EventType.FAILED: OrderState.FAILED,
    EventType.TERMINATED: OrderState.TERMINATED,
}
"""`address_updated` and `command_rejected` leave the state as it is."""

# the order column each of these events carries in `data` under the same name
FACT_OF_EVENT: dict[EventType, str] = {
    EventType.ADDRESS_UPDATED: "address",
    EventType.CARRIER_DISPATCHED: "tracking_number",
    EventType.SHIPPED: "tracking_number",
}

EVENTS_WITH_REASON = frozenset({EventType.CANCELLED, EventType.FAILED, EventType.TERMINATED})


async def record_event(session: AsyncSession, event: OrderEvent) -> bool:
    """Store the event and project it; False if it was stored before (nothing done)."""
    inserted = await session.execute(
        insert(AuditEvent)
        .values(event.model_dump())
        .on_conflict_do_nothing()
        .returning(col(AuditEvent.event_id))
    )
    if inserted.first() is None:
        return False
    if event.seq > 0:  # seq 0: a rejection outside any lifecycle, nothing to project
        await _project_state(session, event)
        await _project_fact(session, event)
    return True


async def _project_state(session: AsyncSession, event: OrderEvent) -> None:
    state = STATE_OF_EVENT.get(event.type)
    if state is None:
        return
    values: dict[str, Any] = {
        "state": state.value,
        "last_event_seq": event.seq,
        "updated_at": event.occurred_at,
    }
    if event.type in EVENTS_WITH_REASON and event.data.get("reason"):
        values["reason"] = event.data["reason"]
    # a missing row (no order_received yet) matches nothing: the projection is skipped
    await session.execute(
        update(Order)
        .where(col(Order.id) == event.order_id, col(Order.last_event_seq) < event.seq)
        .values(values)
    )


async def _project_fact(session: AsyncSession, event: OrderEvent) -> None:
    column = FACT_OF_EVENT.get(event.type)
    value = event.data.get(column) if column else None
    if column is None or value is None:
        return
    if not await _lock_order(session, event.order_id):
        return
    if await _newer_event_of_type(session, event):
        return
    await session.execute(
        update(Order)
        .where(col(Order.id) == event.order_id)
        .values({column: value, "updated_at": func.greatest(col(Order.updated_at), event.occurred_at)})
    )


async def _lock_order(session: AsyncSession, order_id: str) -> bool:
    """Lock the order's row (False if there is none yet).

    Holding it, the check for a newer event sees every concurrent transaction that projected one
    before us, and any that comes later waits for us and then sees our event.
    """
    row = await session.execute(select(col(Order.id)).where(col(Order.id) == order_id).with_for_update())
    return row.first() is not None


async def _newer_event_of_type(session: AsyncSession, event: OrderEvent) -> bool:
    newer = await session.execute(
        select(col(AuditEvent.event_id))
        .where(
            col(AuditEvent.order_id) == event.order_id,
            col(AuditEvent.type) == event.type.value,
            col(AuditEvent.seq) > event.seq,
        )
        .limit(1)
    )
    return newer.first() is not None
