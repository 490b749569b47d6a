"""Queries of the read model: the orders table and the audit table of events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from services.api.auth import may_read, sees_every_order
from shared.contracts import Actor, OrderState
from shared.db import AuditEvent, Order

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# `<created_at in microseconds since EPOCH>_<order id>` (an `Identifier`). Every string of this form
# is a cursor (17 digits stay below the year 9999), so the OpenAPI document describes cursors exactly.
CURSOR_PATTERN = r"^[0-9]{1,17}_[A-Za-z0-9._-]{1,64}$"


@dataclass(frozen=True)
class Cursor:
    """Where a page of orders ended: (created_at, id) of its last order, newest first."""

    created_at: datetime
    order_id: str

    def encode(self) -> str:
        micros = (self.created_at - EPOCH) // timedelta(microseconds=1)
        return f"{micros}_{self.order_id}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor `text` (matching `CURSOR_PATTERN`) stands for."""
        micros, order_id = text.split("_", 1)
        return cls(created_at=EPOCH + timedelta(microseconds=int(micros)), order_id=order_id)


async def find_order(session: AsyncSession, order_id: str) -> Order | None:
    return await session.get(Order, order_id)


async def readable_by(session: AsyncSession, actor: Actor, order_id: str) -> bool:
    """Whether `actor` may read the order: a reviewer or operator any, a customer one the orders
    table says it placed."""
    if sees_every_order(actor):
        return True
    order = await find_order(session, order_id)
    return order is not None and may_read(actor, order.placed_by)


async def list_orders(
    session: AsyncSession,
    state: OrderState | None,
    limit: int,
    after: Cursor | None,
    placed_by: str | None = None,
) -> tuple[list[Order], Cursor | None]:
    """One page, newest first (the order of the `ix_orders_created_at` index), and the next cursor;
    only the orders `placed_by` placed, when it is given."""
    created_at, order_id = col(Order.created_at), col(Order.id)
    query = select(Order).order_by(created_at.desc(), order_id).limit(limit + 1)
    if placed_by is not None:
        query = query.where(Order.placed_by == placed_by)
    if state is not None:
        query = query.where(Order.state == state.value)
    if after is not None:
        query = query.where(
            or_(
                created_at < after.created_at, and_(created_at == after.created_at, order_id > after.order_id)
            )
        )
    orders = list(await session.scalars(query))
    if len(orders) <= limit:
        return orders, None
    last = orders[limit - 1]
    assert last.created_at is not None  # the column is NOT NULL
    return orders[:limit], Cursor(created_at=last.created_at, order_id=last.id)


async def order_events(session: AsyncSession, order_id: str) -> list[AuditEvent]:
    query = (
        select(AuditEvent)
        .where(AuditEvent.order_id == order_id)
        .order_by(col(AuditEvent.seq), col(AuditEvent.recorded_at))
    )
    return list(await session.scalars(query))
