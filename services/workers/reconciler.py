"""Orders whose workflow closed without running its own ending, ended truthfully.

Terminating a workflow (`temporal workflow terminate`, the UI's Terminate, a workflow timeout)
runs no workflow code: no refund, no terminal event, the admission slot never released, and the
order would stay `awaiting_approval` or `shipping` forever. The reconciler runs beside the
workers, which own the business functions and the event publishing. It looks for orders whose
admission row says their lifecycle runs (holding a slot, waiting for one, or waiting for their
reviewer) while their workflow is closed, and ends each as the workflow would have:

1. the events the lifecycle emitted (the `events` query replays its history) are published, so
   those it never got out arrive, each with its own id (the audit table keeps each once);
2. unless the last of them is terminal, a charge is refunded (or the payment voided, so an
   attempt cut short cannot charge later) and an `order.terminated` event follows, saying why
   and whether money had been charged;
3. the slot is released (to the approved order waiting longest for one, if any).

Each order is handled under its admission row's lock, so several worker processes share the
work without doing it twice; a failure leaves the row as it was, for the next round.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from uuid import NAMESPACE_URL, uuid5

import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHistoryEventFilterType,
)
from temporalio.service import RPCError, RPCStatusCode

from services.workers import business
from services.workers.activities import wake_resumed
from shared.admissions import AdmissionSlots, AdmissionStatus
from shared.broker import Topology, publish_event
from shared.consuming import stopped_within
from shared.contracts import OrderEvent, TerminatedData, event_of
from shared.db import Admission, Order, transaction
from shared.lifecycle import EVENTS_QUERY, order_workflow_id

RECONCILE_INTERVAL_SECONDS = 5.0
REVIEWING_PER_ROUND = 50
"""Orders waiting for their reviewer, looked at per round: any number may wait, so they take turns."""
SETTLE_TIME = timedelta(seconds=5)
"""How long a workflow has been closed before we act: what it had in flight when it closed (an
event batch being published, a slot release) gets to land first."""

QUERY_TIMEOUT = timedelta(seconds=10)  # a closed workflow is replayed by a worker to answer

CLEAN_ENDINGS = frozenset({WorkflowExecutionStatus.COMPLETED, WorkflowExecutionStatus.CANCELED})

log = structlog.get_logger(__name__)

Sessions = async_sessionmaker[AsyncSession]


STARTED = [AdmissionStatus.RUNNING.value, AdmissionStatus.RESUMING.value]
"""Lifecycles started, not ended, and holding or waiting for a slot: looked at every round."""


class Reconciler:
    def __init__(self, client: Client, sessions: Sessions, topology: Topology, slots: AdmissionSlots) -> None:
        self._client = client
        self._sessions = sessions
        self._topology = topology
        self._slots = slots
        self._reviewing_after = ""  # where the next round's turn of orders in review begins

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every few seconds until `stop` is set; a failed round waits for the next."""
        while not await stopped_within(stop, RECONCILE_INTERVAL_SECONDS):
            try:
                await self.reconcile()
            except Exception as error:  # noqa: BLE001 (housekeeping must never stop the workers)
                log.warning("reconciling failed; trying again", error=repr(error))

    async def reconcile(self) -> list[str]:
        """One round; returns the orders it ended."""
        ended = []
        for order_id in await self._started() + await self._reviewing():
            try:
                if await self._reconcile(order_id):
                    ended.append(order_id)
            except Exception as error:  # noqa: BLE001 (one order's trouble must not hold up the rest)
                log.warning(
                    "could not reconcile the order; trying again", order_id=order_id, error=repr(error)
                )
        return ended

    async def _started(self) -> list[str]:
        async with self._sessions() as session:
            settled = func.now() - SETTLE_TIME
            rows = await session.scalars(
                select(col(Admission.order_id)).where(
                    col(Admission.status).in_(STARTED), col(Admission.admitted_at) < settled
                )
            )
            return list(rows)

    async def _reviewing(self) -> list[str]:
        """The next turn of orders waiting for their reviewer."""
        async with self._sessions() as session:
            rows = list(
                await session.scalars(
                    select(col(Admission.order_id))
                    .where(
                        col(Admission.status) == AdmissionStatus.REVIEWING.value,
                        col(Admission.order_id) > self._reviewing_after,
                    )
                    .order_by(col(Admission.order_id))
                    .limit(REVIEWING_PER_ROUND)
                )
            )
        self._reviewing_after = rows[-1] if len(rows) == REVIEWING_PER_ROUND else ""
        return rows

    async def _reconcile(self, order_id: str) -> bool:
        handle = self._client.get_workflow_handle(order_workflow_id(order_id))
        try:
            description = await handle.describe()
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            return False  # nothing to reconcile from (the bridge has not started it, say)
        if not _closed_long_enough(description):
            return False
        async with transaction(self._sessions) as session:
            if not await _lock_slot(session, order_id):
                return False  # released meanwhile, or another worker process has it
            emitted: list[OrderEvent] = await handle.query(
                EVENTS_QUERY, result_type=list[OrderEvent], rpc_timeout=QUERY_TIMEOUT
            )
            for event in emitted:
                await publish_event(self._topology, event)
            if not emitted[-1].type.is_terminal:
                await self._end(session, order_id, description, emitted[-1])
            resumed = await self._slots.release_in(session, order_id)
        await wake_resumed(self._client, resumed)
        if description.status in CLEAN_ENDINGS:
            log.warning("released the slot of a lifecycle that ended without releasing it", order_id=order_id)
        return True

    async def _end(
        self,
        session: AsyncSession,
        order_id: str,
        description: WorkflowExecutionDescription,
        last: OrderEvent,
    ) -> None:
        order = await session.get(Order, order_id)
        assert order is not None, f"order {order_id} holds a slot but has no row"
        # refunding an order that never reached its charge only voids a payment nobody charged
        refunded = await business.payment_refunded(
            self._sessions, payment_id=order.payment_id, order_id=order_id, amount_cents=order.amount_cents
        )
        reason = await self._why_closed(description)
        assert description.close_time is not None
        data = TerminatedData(
            reason=reason,
            workflow_status=_status_name(description.status),
            charged=refunded,  # every charge is refunded: True only if there was one
            refunded=refunded,
        )
        terminated = event_of(
            data,
            event_id=uuid5(NAMESPACE_URL, f"orderflow:{description.id}/{description.run_id}/terminated"),
            order_id=order_id,
            seq=last.seq + 1,
            occurred_at=description.close_time,
            correlation_id=last.correlation_id,
        )
        await publish_event(self._topology, terminated)
        log.warning(
            "state transition",
            order_id=order_id,
            state="terminated",
            seq=terminated.seq,
            reason=reason,
            refunded=refunded,
        )

    async def _why_closed(self, description: WorkflowExecutionDescription) -> str:
        handle = self._client.get_workflow_handle(description.id, run_id=description.run_id)
        async for event in handle.fetch_history_events(
            event_filter_type=WorkflowHistoryEventFilterType.CLOSE_EVENT
        ):
            if event.event_type == HistoryEventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
                attributes = event.workflow_execution_terminated_event_attributes
                by = f" by {attributes.identity}" if attributes.identity else ""
                return f"terminated through Temporal{by}: {attributes.reason or 'no reason given'}"
        return f"the workflow closed as {_status_name(description.status)} without ending the order"


def _closed_long_enough(description: WorkflowExecutionDescription) -> bool:
    if description.status in (None, WorkflowExecutionStatus.RUNNING) or description.close_time is None:
        return False
    return description.close_time < datetime.now(description.close_time.tzinfo) - SETTLE_TIME


def _status_name(status: WorkflowExecutionStatus | None) -> str:
    return status.name.lower() if status is not None else "unknown"


async def _lock_slot(session: AsyncSession, order_id: str) -> bool:
    row = await session.scalar(
        select(col(Admission.order_id))
        .where(
            col(Admission.order_id) == order_id,
            col(Admission.status).in_([*STARTED, AdmissionStatus.REVIEWING.value]),
        )
        .with_for_update(skip_locked=True)
    )
    return row is not None
