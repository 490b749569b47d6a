"""Activities: unpack the input, call the business function, return. Nothing else lives here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from temporalio import activity
from temporalio.exceptions import ApplicationError

from services.workers import business
from services.workers.steps import (
    ORDER_INVALID,
    Activities,
    ChargeRequest,
    ChargeResult,
    DispatchRequest,
    DispatchResult,
)
from shared.broker import Topology, publish_event
from shared.contracts import OrderEvent, PlaceOrder


class OrderActivities:
    def __init__(self, sessions: business.Sessions, topology: Topology) -> None:
        self._sessions = sessions
        self._topology = topology

    @activity.defn(name=Activities.RECEIVE_ORDER)
    async def receive_order(self, order: PlaceOrder) -> None:
        await business.order_received(self._sessions, order)

    @activity.defn(name=Activities.VALIDATE_ORDER)
    async def validate_order(self, order_id: str) -> None:
        with _business_rules():
            await business.order_validated(self._sessions, order_id)

    @activity.defn(name=Activities.CHARGE_PAYMENT)
    async def charge_payment(self, request: ChargeRequest) -> ChargeResult:
        with _business_rules():
            outcome = await business.payment_charged(
                self._sessions,
                payment_id=request.payment_id,
                order_id=request.order_id,
                amount_cents=request.amount_cents,
            )
        return ChargeResult(already_charged=outcome is business.ChargeOutcome.ALREADY_CHARGED)

    @activity.defn(name=Activities.PREPARE_PACKAGE)
    async def prepare_package(self, order_id: str) -> None:
        await business.package_prepared(self._sessions, order_id)

    @activity.defn(name=Activities.DISPATCH_CARRIER)
    async def dispatch_carrier(self, request: DispatchRequest) -> DispatchResult:
        tracking_number = await business.carrier_dispatched(
            self._sessions, request.order_id, request.address
        )
        return DispatchResult(tracking_number=tracking_number)

    @activity.defn(name=Activities.MARK_SHIPPED)
    async def mark_shipped(self, order_id: str) -> None:
        await business.order_shipped(self._sessions, order_id)

    @activity.defn(name=Activities.REFUND_PAYMENT)
    async def refund_payment(self, payment_id: str) -> bool:
        return await business.payment_refunded(self._sessions, payment_id)

    @activity.defn(name=Activities.PUBLISH_EVENTS)
    async def publish_events(self, events: list[OrderEvent]) -> None:
        # in order, each confirmed by the broker before the next
        for event in events:
            await publish_event(self._topology, event)


@contextmanager
def _business_rules() -> Iterator[None]:
    """Turns a business-rule violation into a non-retryable activity failure."""
    try:
        yield
    except business.OrderInvalid as exc:
        raise ApplicationError(str(exc), type=ORDER_INVALID, non_retryable=True) from exc
