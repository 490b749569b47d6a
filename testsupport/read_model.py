"""Rows of the orders read model and the audit table, written as orderflow's services write them,
and the events the audit consumer projects onto them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from pydantic import JsonValue
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.contracts import EVENT_DATA, EXAMPLE_DATA, EventType, OrderEvent, OrderState
from shared.db import AuditEvent, Order, transaction
from testsupport.orders import ADDRESS, ITEMS

EVENTS_START = datetime(2026, 1, 1, tzinfo=UTC)
"""When `event`'s events happen: seq seconds after it."""


def event(order_id: str, seq: int, type: EventType, **data: Any) -> OrderEvent:
    """An event of `type` with `data`; what it does not say comes from the type's example."""
    return OrderEvent(
        event_id=uuid4(),
        type=type,
        order_id=order_id,
        seq=seq,
        occurred_at=EVENTS_START + timedelta(seconds=seq),
        data=EVENT_DATA[type].model_validate({**EXAMPLE_DATA[type].model_dump(), **data}),
    )


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
    sessions: async_sessionmaker[AsyncSession],
    order_id: str,
    types_by_seq: dict[int, EventType],
    example_data: bool = False,
) -> None:
    """Rows of the audit table, as the audit consumer writes them; their data marks their seq, or is
    the contract's example of their type."""
    async with transaction(sessions) as session:
        for seq, event_type in types_by_seq.items():
            data: dict[str, JsonValue] = (
                EXAMPLE_DATA[event_type].model_dump(mode="json") if example_data else {"seq_was": seq}
            )
            session.add(
                AuditEvent(
                    event_id=uuid4(),
                    order_id=order_id,
                    seq=seq,
                    type=event_type.value,
                    occurred_at=datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=seq),
                    data=data,
                )
            )
