"""What the workflows exchange with their activities and with each other.

One pydantic input model per activity, and `OrderActivities`, the activities' signatures: workflows
call `OrderActivities.charge_payment` and friends by reference, so the type checker sees each call.
The implementation (`activities.BusinessActivities`) and the tests' mocks subclass it. Workflow code
imports this module, so it holds no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime

from pydantic import BaseModel
from temporalio import activity

from shared.contracts import Address, OrderEvent, PlaceOrder, Step, StepError
from shared.lifecycle import LifecyclePolicy

ORDER_INVALID = "OrderInvalid"
DEPENDENCY_UNAVAILABLE = "DependencyUnavailable"  # the database could not be reached: not the step's fault
PAYMENT_VOIDED = "PaymentVoided"  # a charge attempt outlived its order's stop; only ever abandoned
"""ApplicationError type of a business-rule violation: not retried, the order fails."""


# --- activity inputs and results -----------------------------------------------------------------
class ReceiveOrderInput(BaseModel):
    order: PlaceOrder


class ValidateOrderInput(BaseModel):
    order_id: str


class ChargePaymentInput(BaseModel):
    order_id: str
    payment_id: str
    amount_cents: int


class ChargeResult(BaseModel):
    already_charged: bool


class PreparePackageInput(BaseModel):
    order_id: str


class DispatchCarrierInput(BaseModel):
    order_id: str
    address: Address


class DispatchResult(BaseModel):
    tracking_number: str


class MarkShippedInput(BaseModel):
    order_id: str


class RefundPaymentInput(BaseModel):
    payment_id: str
    order_id: str
    amount_cents: int


class PublishEventsInput(BaseModel):
    events: list[OrderEvent]


class ReleaseAdmissionInput(BaseModel):
    order_id: str


class OrderActivities(ABC):
    """The activities of both workers, as the workflows see them."""

    @activity.defn
    @abstractmethod
    async def receive_order(self, input: ReceiveOrderInput) -> None: ...

    @activity.defn
    @abstractmethod
    async def validate_order(self, input: ValidateOrderInput) -> None: ...

    @activity.defn
    @abstractmethod
    async def charge_payment(self, input: ChargePaymentInput) -> ChargeResult: ...

    @activity.defn
    @abstractmethod
    async def prepare_package(self, input: PreparePackageInput) -> None: ...

    @activity.defn
    @abstractmethod
    async def dispatch_carrier(self, input: DispatchCarrierInput) -> DispatchResult: ...

    @activity.defn
    @abstractmethod
    async def mark_shipped(self, input: MarkShippedInput) -> None: ...

    @activity.defn
    @abstractmethod
    async def refund_payment(self, input: RefundPaymentInput) -> bool:
        """True if the payment is refunded; False if no charge had committed, which voids it."""

    @activity.defn
    @abstractmethod
    async def publish_events(self, input: PublishEventsInput) -> None:
        """In order, each confirmed by the broker before the next."""

    @activity.defn
    @abstractmethod
    async def release_admission(self, input: ReleaseAdmissionInput) -> None:
        """Give the order's admission slot back (idempotent)."""


# --- OrderWorkflow ↔ ShippingWorkflow ------------------------------------------------------------
class StepAttempts(BaseModel):
    """How a step the shipping child ran went: the parent owns the order's status."""

    step: Step
    attempts: int
    errors: list[StepError] = []


class ShippingInput(BaseModel):
    order_id: str
    parent_workflow_id: str
    address: Address
    package_ready: bool
    policy: LifecyclePolicy
    deadline: datetime
    """The lifecycle's deadline: a step still running then gives up."""


class PackagePrepared(BaseModel):
    """Signal to the parent: the package is ready for the carrier."""

    prepare: StepAttempts


class DispatchFailed(BaseModel):
    """Signal to the parent: this shipment could not dispatch; the parent decides what next."""

    reason: str
    dispatch: StepAttempts


class CarrierDispatched(BaseModel):
    """The carrier has the package: the tracking number and the address it was given."""

    tracking_number: str
    address: Address
    dispatch: StepAttempts


class ShippingResult(BaseModel):
    dispatched: CarrierDispatched | None = None
    """None: dispatch failed, and the shipment signalled `DispatchFailed` before it ended."""
