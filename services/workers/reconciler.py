"""Orders whose workflow closed without its own ending (terminated, timed out) ended truthfully: their
events published, a charge refunded, `order.terminated` sent, the slot released. Under the admission
row's lock, so several worker processes share the work; a failure leaves the row for the next round."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import NAMESPACE_URL, uuid5

import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHistoryEventFilterType,
)
from temporalio.service import RPCError, RPCStatusCode

from services.workers import business_functions as business
from services.workers.activities import wake_resumed
from services.workers.activity_interface import PaymentInput
from shared.admission_table import AdmissionSlots, AdmissionStatus
from shared.broker import Topology, publish_event
from shared.consuming import periodically
from shared.contracts import OrderEvent, TerminatedData, event_of
from shared.db import Admission, Order, transaction
from shared.lifecycle import EVENTS_QUERY, order_workflow_id

RECONCILE_INTERVAL_SECONDS = 5.0
# orders in review looked at per round: any number may wait for their reviewer, so they take turns
REVIEWING_PER_ROUND = 50
# a workflow closed this long ago is ours: what it had in flight (events, a slot release) has landed
SETTLE_TIME = timedelta(seconds=5)
QUERY_TIMEOUT = timedelta(seconds=10)  # a closed workflow is replayed by a worker to answer
CLEAN_ENDINGS = frozenset({WorkflowExecutionStatus.COMPLETED, WorkflowExecutionStatus.CANCELED})
# lifecycles started, not ended, and holding or waiting for a slot: looked at every round
STARTED = [AdmissionStatus.RUNNING.value, AdmissionStatus.RESUMING.value]
LIFECYCLE_ROWS = [*STARTED, AdmissionStatus.REVIEWING.value]  # the rows the reconciler may end

log = structlog.get_logger(__name__)


@dataclass
class Reconciler:
    client: Client
    sessions: business.Sessions
    topology: Topology
    slots: AdmissionSlots
    reviewing_after: str = field(default="", init=False)  # where the next turn of orders in review begins

    async def run(self, stop: asyncio.Event) -> None:
        await periodically(
            stop, RECONCILE_INTERVAL_SECONDS, self.reconcile, "reconciling failed; trying again"
        )

    async def reconcile(self) -> list[str]:
        """One round; returns the orders it ended."""
        ended = []
        for order_id in await self._due():
            try:
                if await self._reconcile(order_id):
                    ended.append(order_id)
            except Exception as error:  # noqa: BLE001 (one order's trouble must not hold up the rest)
                log.warning(
                    "could not reconcile the order; trying again", order_id=order_id, error=repr(error)
                )
        return ended

    async def _due(self) -> list[str]:
        """The started lifecycles admitted a while ago, and the next turn of those in review."""
        order_id, status = col(Admission.order_id), col(Admission.status)
        started = select(order_id).where(
            status.in_(STARTED), col(Admission.admitted_at) < func.now() - SETTLE_TIME
        )
        reviewing = (
            select(order_id)
            .where(status == AdmissionStatus.REVIEWING.value, order_id > self.reviewing_after)
            .order_by(order_id)
            .limit(REVIEWING_PER_ROUND)
        )
        async with self.sessions() as session:
            running = list(await session.scalars(started))
            in_review = list(await session.scalars(reviewing))
        self.reviewing_after = in_review[-1] if len(in_review) == REVIEWING_PER_ROUND else ""
        return running + in_review

    async def _reconcile(self, order_id: str) -> bool:
        handle = self.client.get_workflow_handle(order_workflow_id(order_id))
        try:
            description = await handle.describe()
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            return False  # nothing to reconcile from (the bridge has not started it, say)
        if not _closed_long_enough(description):
            return False
        lock_slot = (
            select(col(Admission.order_id))
            .where(col(Admission.order_id) == order_id, col(Admission.status).in_(LIFECYCLE_ROWS))
            .with_for_update(skip_locked=True)
        )
        async with transaction(self.sessions) as session:
            if await session.scalar(lock_slot) is None:
                return False  # released meanwhile, or another worker process has it
            emitted: list[OrderEvent] = await handle.query(
                EVENTS_QUERY, result_type=list[OrderEvent], rpc_timeout=QUERY_TIMEOUT
            )
            for event in emitted:
                await publish_event(self.topology, event)
            if not emitted[-1].type.is_terminal:
                await self._end(session, description, emitted[-1])
            resumed = await self.slots.release_in(session, order_id)
        await wake_resumed(self.client, resumed)
        if description.status in CLEAN_ENDINGS:
            log.warning("released the slot of a lifecycle that ended without releasing it", order_id=order_id)
        return True

    async def _end(
        self, session: AsyncSession, description: WorkflowExecutionDescription, last: OrderEvent
    ) -> None:
        order_id = last.order_id
        order = await session.get(Order, order_id)
        assert order is not None, f"order {order_id} holds a slot but has no row"
        # refunding an order that never reached its charge only voids a payment nobody charged
        payment = PaymentInput(
            order_id=order_id, payment_id=order.payment_id, amount_cents=order.amount_cents
        )
        refunded = await business.payment_refunded(self.sessions, payment)
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
        await publish_event(self.topology, terminated)
        log.warning(
            "state transition",
            order_id=order_id,
            state="terminated",
            seq=terminated.seq,
            reason=reason,
            refunded=refunded,
        )

    async def _why_closed(self, description: WorkflowExecutionDescription) -> str:
        handle = self.client.get_workflow_handle(description.id, run_id=description.run_id)
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
