"""Queries of the read model: the orders table and the audit table of events."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from shared.contracts import OrderState
from shared.db import AuditEvent, Order


class InvalidCursor(ValueError):
    pass


@dataclass(frozen=True)
class Cursor:
    """Where a page of orders ended: (created_at, id) of its last order, newest first."""

    created_at: datetime
    order_id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), self.order_id]).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            created_at, order_id = json.loads(base64.urlsafe_b64decode(text.encode()))
            return cls(created_at=datetime.fromisoformat(created_at), order_id=str(order_id))
        except (binascii.Error, UnicodeError, TypeError, ValueError) as error:
            raise InvalidCursor("cursor is not one this API issued: pass a next_cursor back as is") from error


async def find_order(session: AsyncSession, order_id: str) -> Order | None:
    return await session.get(Order, order_id)


async def list_orders(
    session: AsyncSession, state: OrderState | None, limit: int, after: Cursor | None
) -> tuple[list[Order], Cursor | None]:
    """One page, newest first (the order of the `ix_orders_created_at` index), and the next cursor."""
    created_at, order_id = col(Order.created_at), col(Order.id)
    query = select(Order).order_by(created_at.desc(), order_id).limit(limit + 1)
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
