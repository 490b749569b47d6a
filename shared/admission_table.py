"""The `admissions` table, which bounds how many lifecycles run at once. The bridge admits placements; a
lifecycle gives its slot back while in review and, once approved, gets one before any placement. A freed
slot goes to the longest-waiting approved order, else to the bridges (NOTIFY on `ADMISSIONS_CHANNEL`)."""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import transaction

ADMISSIONS_CHANNEL = "orderflow_admissions"  # NOTIFY: a payload-less ping whenever a slot is released

# any fixed number: the key of the advisory lock under which slots are counted and taken
SLOT_LOCK_KEY = 0x0F5E_ADD1


class AdmissionStatus(StrEnum):
    UNPLACED = "unplaced"  # commands arrived before their placement
    WAITING = "waiting"  # placement registered, no slot yet
    ADMITTING = "admitting"  # slot taken, the lifecycle is being started
    RUNNING = "running"  # lifecycle started and holding its slot
    REVIEWING = "reviewing"  # waiting for its reviewer: slot given back
    RESUMING = "resuming"  # approved, waiting for a slot to go on (before any placement)
    ENDED = "ended"  # lifecycle ended, slot released
    CANCELLED = "cancelled"  # cancelled while waiting: never started

    @property
    def holds_slot(self) -> bool:
        return self in (AdmissionStatus.ADMITTING, AdmissionStatus.RUNNING)

    @property
    def in_lifecycle(self) -> bool:
        """Its lifecycle has started and not ended (whether it holds a slot now or not)."""
        return self.holds_slot or self in (AdmissionStatus.REVIEWING, AdmissionStatus.RESUMING)


LOCK_SLOTS = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=SLOT_LOCK_KEY)
LOCK_ORDER = text("SELECT status FROM admissions WHERE order_id = :order_id FOR UPDATE")
LEAVE_FOR_REVIEW = text(
    "UPDATE admissions SET status = 'reviewing' WHERE order_id = :order_id AND status = 'running'"
)
END = text("UPDATE admissions SET status = 'ended', ended_at = now() WHERE order_id = :order_id")
# under LOCK_SLOTS, taken by an earlier statement (see services/bridge/admission_gate.py): the slot
# goes to the order if the lifecycles holding one, and the approved orders that asked before it,
# leave one free
RESUME = text(
    """
    WITH mine AS (SELECT coalesce(resuming_since, now()) AS since FROM admissions WHERE order_id = :order_id)
    UPDATE admissions SET status = 'running'
    WHERE order_id = :order_id
      AND (SELECT count(*) FROM admissions, mine
           WHERE status IN ('admitting', 'running')
              OR (status = 'resuming' AND (resuming_since, order_id) < (mine.since, :order_id))
          ) < :max_running
    RETURNING order_id
    """
)
WAIT_TO_RESUME = text(
    "UPDATE admissions SET status = 'resuming', resuming_since = coalesce(resuming_since, now())"
    " WHERE order_id = :order_id"
)
# under LOCK_SLOTS: the longest-waiting approved order gets the slot just freed, if it is free
HAND_ON = text(
    """
    UPDATE admissions SET status = 'running'
    WHERE order_id = (
        SELECT order_id FROM admissions WHERE status = 'resuming'
        ORDER BY resuming_since, order_id LIMIT 1 FOR UPDATE SKIP LOCKED
    )
      AND (SELECT count(*) FROM admissions WHERE status IN ('admitting', 'running')) < :max_running
    RETURNING order_id
    """
)
NOTIFY_RELEASED = text("SELECT pg_notify(:channel, '')").bindparams(channel=ADMISSIONS_CHANNEL)


class AdmissionSlots:
    """What a running lifecycle does with its slot, each in a transaction holding the order's row lock.
    Those that hand a slot on return the approved order that got it, for the caller to wake."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], max_running: int) -> None:
        self._sessions = sessions  # transactional: the slot lock lasts until the commit
        self._max_running = max_running

    async def leave_for_review(self, order_id: str) -> str | None:
        """The order waits for its reviewer: give its slot back, if it holds one."""
        async with transaction(self._sessions) as session:
            if await self._locked_status(session, order_id) is not AdmissionStatus.RUNNING:
                return None
            await session.execute(LEAVE_FOR_REVIEW, {"order_id": order_id})
            return await self._hand_on(session)

    async def resume(self, order_id: str) -> bool:
        """The order is approved: True once it holds a slot again, else it waits `resuming`."""
        async with transaction(self._sessions) as session:
            status = await self._locked_status(session, order_id)
            if status not in (AdmissionStatus.REVIEWING, AdmissionStatus.RESUMING):
                return True  # it holds one (handed on to it), or was never admitted by a bridge
            await session.execute(LOCK_SLOTS)
            ids = {"order_id": order_id, "max_running": self._max_running}
            if await session.scalar(RESUME, ids) is not None:
                return True
            await session.execute(WAIT_TO_RESUME, ids)
            return False

    async def release(self, order_id: str) -> str | None:
        """The order's lifecycle has ended: free its slot, or its place in the queue for one. Idempotent."""
        async with transaction(self._sessions) as session:
            return await self.release_in(session, order_id)

    async def release_in(self, session: AsyncSession, order_id: str) -> str | None:
        """`release`, within the caller's transaction."""
        status = await self._locked_status(session, order_id)
        if status is None or not status.in_lifecycle:
            return None
        await session.execute(END, {"order_id": order_id})
        if status is AdmissionStatus.REVIEWING:
            return None  # it held nothing anyone waits for
        return await self._hand_on(session)

    async def _hand_on(self, session: AsyncSession) -> str | None:
        """A slot was freed: to the longest-waiting approved order, else to the bridges."""
        await session.execute(LOCK_SLOTS)
        resumed: str | None = await session.scalar(HAND_ON, {"max_running": self._max_running})
        await session.execute(NOTIFY_RELEASED)
        return resumed

    @staticmethod
    async def _locked_status(session: AsyncSession, order_id: str) -> AdmissionStatus | None:
        status = await session.scalar(LOCK_ORDER, {"order_id": order_id})
        return None if status is None else AdmissionStatus(status)
