"""`OrderActivities` implemented: each business step's attempt calls its business function; the
other activities refund, publish events, and move the order's admission slot."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractRobustConnection
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from services.workers import business_functions as business
from services.workers.activity_interface import (
    ORDER_INVALID,
    PAYMENT_VOIDED,
    ChargeOutcome,
    DispatchCarrierInput,
    OrderActivities,
    PaymentInput,
)
from services.workers.steps import DEPENDENCY_UNAVAILABLE, describe_failure
from shared.admission_table import AdmissionSlots
from shared.broker import Topology, publish_event
from shared.consuming import is_transient
from shared.contracts import OrderEvent, PlaceOrder
from shared.lifecycle import Signals, order_workflow_id

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BusinessActivities(OrderActivities):
    sessions: business.Sessions
    topology: Topology
    broker: AbstractRobustConnection
    slots: AdmissionSlots
    client: Client  # to wake an approved order that a freed slot went to

    async def receive_order(self, order: PlaceOrder) -> None:
        with _step_failures():
            await business.order_received(self.sessions, order)

    async def validate_order(self, order_id: str) -> None:
        with _step_failures():
            await business.order_validated(self.sessions, order_id)

    async def charge_payment(self, payment: PaymentInput) -> ChargeOutcome:
        with _step_failures():
            return await business.payment_charged(self.sessions, payment)

    async def prepare_package(self, order_id: str) -> None:
        with _step_failures():
            await business.package_prepared(self.sessions, order_id)

    async def dispatch_carrier(self, dispatch: DispatchCarrierInput) -> str:
        with _step_failures():
            return await business.carrier_dispatched(self.sessions, dispatch.order_id, dispatch.address)

    async def mark_shipped(self, order_id: str) -> None:
        with _step_failures():
            await business.order_shipped(self.sessions, order_id)

    @activity.defn
    async def refund_payment(self, payment: PaymentInput) -> bool:
        return await business.payment_refunded(self.sessions, payment)

    @activity.defn
    async def publish_events(self, events: list[OrderEvent]) -> None:
        if activity.info().is_local and not self.broker.connected.is_set():
            # a local activity holds its workflow task open: the regular activity waits for the broker
            raise ApplicationError("the broker is away", type=DEPENDENCY_UNAVAILABLE, non_retryable=True)
        # the confirms awaited together; sent in order still, as each publish takes the channel's lock in turn
        await asyncio.gather(*(publish_event(self.topology, event) for event in events))

    @activity.defn
    async def leave_admission_for_review(self, order_id: str) -> None:
        await wake_resumed(self.client, await self.slots.leave_for_review(order_id))

    @activity.defn
    async def resume_admission(self, order_id: str) -> bool:
        return await self.slots.resume(order_id)

    @activity.defn
    async def release_admission(self, order_id: str) -> None:
        await wake_resumed(self.client, await self.slots.release(order_id))


async def wake_resumed(client: Client, order_id: str | None) -> None:
    """Tell the approved order a freed slot went to that it holds one (best effort: it asks again too)."""
    if order_id is None:
        return
    try:
        await client.get_workflow_handle(order_workflow_id(order_id)).signal(Signals.SLOT_FREED)
    except RPCError as error:
        log.warning("could not wake the order a slot went to", order_id=order_id, error=repr(error))


@contextmanager
def _step_failures() -> Iterator[None]:
    """A broken rule or a voided payment fails the step for good; a database outage spends no attempt."""
    try:
        yield
    except (business.OrderInvalid, business.PaymentVoided) as exc:
        error_type = ORDER_INVALID if isinstance(exc, business.OrderInvalid) else PAYMENT_VOIDED
        raise ApplicationError(str(exc), type=error_type, non_retryable=True) from exc
    except Exception as exc:
        if is_transient(exc):
            raise ApplicationError(describe_failure(exc), type=DEPENDENCY_UNAVAILABLE) from exc
        raise
