"""Rows of the orders read model and the audit table, written as orderflow's services write them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.contracts import EventType, OrderState
from shared.db import AuditEvent, Order, transaction
from testsupport.orders import ADDRESS, ITEMS


async def insert_order(
    sessions: async_sessionmaker[AsyncSession],
    order_id: str,
    state: OrderState,
    created_at: datetime | None = None,
    placed_by: str | None = None,
) -> None:
    """A row of the orders read model, as the business functions and the projection write it."""
    created_at = created_at or datetime.now(UTC)
    async with transaction(sessions) as session:
        session.add(
            Order(
                id=order_id,
                payment_id=f"pay-{order_id}",
                items=ITEMS,
                address=ADDRESS,
                amount_cents=2500,
                state=state.value,
                placed_by=placed_by,
                created_at=created_at,
                updated_at=created_at,
            )
        )


async def insert_events(
    sessions: async_sessionmaker[AsyncSession], order_id: str, types_by_seq: dict[int, EventType]
) -> None:
    """Rows of the audit table, as the audit consumer writes them."""
    async with transaction(sessions) as session:
        for seq, event_type in types_by_seq.items():
            session.add(
                AuditEvent(
                    event_id=uuid4(),
                    order_id=order_id,
                    seq=seq,
                    type=event_type.value,
                    occurred_at=datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=seq),
                    data={"seq_was": seq},
                )
            )
