"""The activities: unpack the input, call the business function, return. Nothing else lives here.

These are one attempt of each business step; `OrderActivities` runs a step's attempts around them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from aio_pika.abc import AbstractRobustConnection
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from services.workers import business
from services.workers.attempts import DEPENDENCY_UNAVAILABLE, describe_failure
from services.workers.boundary import (
    ORDER_INVALID,
    PAYMENT_VOIDED,
    AdmissionInput,
    ChargePaymentInput,
    ChargeResult,
    DispatchCarrierInput,
    DispatchResult,
    MarkShippedInput,
    OrderActivities,
    PreparePackageInput,
    PublishEventsInput,
    ReceiveOrderInput,
    RefundPaymentInput,
    ValidateOrderInput,
)
from shared.admissions import AdmissionSlots
from shared.broker import Topology, publish_event
from shared.consuming import is_transient
from shared.lifecycle import Signals, order_workflow_id

log = structlog.get_logger(__name__)


class BusinessActivities(OrderActivities):
    """`OrderActivities` on the database (business functions, admissions), the broker, and
    Temporal (to wake an approved order that a freed slot went to)."""

    def __init__(
        self,
        sessions: business.Sessions,
        topology: Topology,
        broker: AbstractRobustConnection,
        slots: AdmissionSlots,
        client: Client,
    ) -> None:
        self._sessions = sessions
        self._topology = topology
        self._broker = broker
        self._slots = slots
        self._client = client

    async def receive_order(self, input: ReceiveOrderInput) -> None:
        with _step_failures():
            await business.order_received(self._sessions, input.order)

    async def validate_order(self, input: ValidateOrderInput) -> None:
        with _step_failures():
            await business.order_validated(self._sessions, input.order_id)

    async def charge_payment(self, input: ChargePaymentInput) -> ChargeResult:
        with _step_failures():
            outcome = await business.payment_charged(
                self._sessions,
                payment_id=input.payment_id,
                order_id=input.order_id,
                amount_cents=input.amount_cents,
            )
        return ChargeResult(already_charged=outcome is business.ChargeOutcome.ALREADY_CHARGED)

    async def prepare_package(self, input: PreparePackageInput) -> None:
        with _step_failures():
            await business.package_prepared(self._sessions, input.order_id)

    async def dispatch_carrier(self, input: DispatchCarrierInput) -> DispatchResult:
        with _step_failures():
            tracking_number = await business.carrier_dispatched(self._sessions, input.order_id, input.address)
        return DispatchResult(tracking_number=tracking_number)

    async def mark_shipped(self, input: MarkShippedInput) -> None:
        with _step_failures():
            await business.order_shipped(self._sessions, input.order_id)

    @activity.defn
    async def refund_payment(self, input: RefundPaymentInput) -> bool:
        return await business.payment_refunded(
            self._sessions,
            payment_id=input.payment_id,
            order_id=input.order_id,
            amount_cents=input.amount_cents,
        )

    @activity.defn
    async def publish_events(self, input: PublishEventsInput) -> None:
        if activity.info().is_local and not self._broker.connected.is_set():
            # a local activity holds its workflow task open: while the broker is away, the batch
            # goes to the regular activity, which waits for it in the background
            raise ApplicationError("the broker is away", type=DEPENDENCY_UNAVAILABLE, non_retryable=True)
        for event in input.events:
            await publish_event(self._topology, event)

    @activity.defn
    async def leave_admission_for_review(self, input: AdmissionInput) -> None:
        await wake_resumed(self._client, await self._slots.leave_for_review(input.order_id))

    @activity.defn
    async def resume_admission(self, input: AdmissionInput) -> bool:
        return await self._slots.resume(input.order_id)

    @activity.defn
    async def release_admission(self, input: AdmissionInput) -> None:
        await wake_resumed(self._client, await self._slots.release(input.order_id))


async def wake_resumed(client: Client, order_id: str | None) -> None:
    """Tell the approved order a freed slot went to that it holds one. Best effort: an order
    waiting for a slot asks again now and then, which covers a wake-up lost here."""
    if order_id is None:
        return
    try:
        await client.get_workflow_handle(order_workflow_id(order_id)).signal(Signals.SLOT_GRANTED)
    except RPCError as error:
        log.warning("could not wake the order a slot went to", order_id=order_id, error=repr(error))


@contextmanager
def _step_failures() -> Iterator[None]:
    """How a business step's failure reaches the workflow: a broken business rule, or a charge of
    a voided payment, fails the step for good; a database outage is told apart from the step
    failing (it will work again once the database is back); anything else is one failed attempt."""
    try:
        yield
    except business.OrderInvalid as exc:
        raise ApplicationError(str(exc), type=ORDER_INVALID, non_retryable=True) from exc
    except business.PaymentVoided as exc:
        raise ApplicationError(str(exc), type=PAYMENT_VOIDED, non_retryable=True) from exc
    except Exception as exc:
        if is_transient(exc):
            raise ApplicationError(describe_failure(exc), type=DEPENDENCY_UNAVAILABLE) from exc
        raise
