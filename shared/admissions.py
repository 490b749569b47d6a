"""Admission of lifecycles: the shared record (`admissions` table) that bounds how many run at once.

The bridge writes a row when a placement arrives and turns it `running` when it starts the
lifecycle; the lifecycle's last step releases the slot here (`release`), and the bridges waiting
for a slot are woken through PostgreSQL's NOTIFY on `ADMISSIONS_CHANNEL`.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from shared.db import Admission, transaction

ADMISSIONS_CHANNEL = "orderflow_admissions"
"""NOTIFY channel: a payload-less ping whenever a slot is released."""


class AdmissionStatus(StrEnum):
    UNPLACED = "unplaced"  # commands arrived before their placement
    WAITING = "waiting"  # placement registered, no slot yet
    ADMITTING = "admitting"  # slot taken, the lifecycle is being started
    RUNNING = "running"  # lifecycle started and holding its slot
    ENDED = "ended"  # lifecycle ended, slot released
    CANCELLED = "cancelled"  # cancelled while waiting: never started

    @property
    def holds_slot(self) -> bool:
        return self in (AdmissionStatus.ADMITTING, AdmissionStatus.RUNNING)


HOLDING_SLOT = [AdmissionStatus.ADMITTING.value, AdmissionStatus.RUNNING.value]


async def release(sessions: async_sessionmaker[AsyncSession], order_id: str) -> bool:
    """The order's lifecycle has ended: free its slot and wake the waiting bridges.
    Idempotent; False if the order held no slot (released before, or never admitted)."""
    async with transaction(sessions) as session:
        released = await session.scalar(
            update(Admission)
            .where(col(Admission.order_id) == order_id, col(Admission.status).in_(HOLDING_SLOT))
            .values(status=AdmissionStatus.ENDED.value, ended_at=func.now())
            .returning(col(Admission.order_id))
        )
        if released is not None:
            await notify_released(session)
    return released is not None


async def notify_released(session: AsyncSession) -> None:
    await session.execute(select(func.pg_notify(ADMISSIONS_CHANNEL, "")))
