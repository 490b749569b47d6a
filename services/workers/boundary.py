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

from services.workers.attempts import StepAttempts, StepDone, StepRun, run_attempts
from shared.contracts import Address, OrderEvent, PlaceOrder
from shared.lifecycle import LifecyclePolicy

ORDER_INVALID = "OrderInvalid"
"""ApplicationError type of a business-rule violation: not retried, the order fails."""
PAYMENT_VOIDED = "PaymentVoided"  # a charge attempt outlived its order's stop; only ever abandoned


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


class AdmissionInput(BaseModel):
    order_id: str


class OrderActivities(ABC):
    """The activities of both workers, as the workflows see them.

    A business step is one local activity (`*_step`) that runs the step's attempts side by side
    (`attempts.run_attempts`); each attempt calls the plain method of the same name, which
    implementations provide.
    """

    # --- business steps --------------------------------------------------------------------------
    @activity.defn
    async def receive_order_step(self, run: StepRun[ReceiveOrderInput]) -> StepDone[None]:
        return await run_attempts(run, self.receive_order)

    @activity.defn
    async def validate_order_step(self, run: StepRun[ValidateOrderInput]) -> StepDone[None]:
        return await run_attempts(run, self.validate_order)

    @activity.defn
    async def charge_payment_step(self, run: StepRun[ChargePaymentInput]) -> StepDone[ChargeResult]:
        return await run_attempts(run, self.charge_payment)

    @activity.defn
    async def prepare_package_step(self, run: StepRun[PreparePackageInput]) -> StepDone[None]:
        return await run_attempts(run, self.prepare_package)

    @activity.defn
    async def dispatch_carrier_step(self, run: StepRun[DispatchCarrierInput]) -> StepDone[DispatchResult]:
        return await run_attempts(run, self.dispatch_carrier)

    @activity.defn
    async def mark_shipped_step(self, run: StepRun[MarkShippedInput]) -> StepDone[None]:
        return await run_attempts(run, self.mark_shipped)

    # --- one attempt of a business step (called inside the step's activity) --------------------
    @abstractmethod
    async def receive_order(self, input: ReceiveOrderInput) -> None: ...

    @abstractmethod
    async def validate_order(self, input: ValidateOrderInput) -> None: ...

    @abstractmethod
    async def charge_payment(self, input: ChargePaymentInput) -> ChargeResult: ...

    @abstractmethod
    async def prepare_package(self, input: PreparePackageInput) -> None: ...

    @abstractmethod
    async def dispatch_carrier(self, input: DispatchCarrierInput) -> DispatchResult: ...

    @abstractmethod
    async def mark_shipped(self, input: MarkShippedInput) -> None: ...

    # --- what the lifecycle does beside its steps ------------------------------------------------

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
    async def leave_admission_for_review(self, input: AdmissionInput) -> None:
        """The order waits for its reviewer: give its slot back meanwhile (idempotent)."""

    @activity.defn
    @abstractmethod
    async def resume_admission(self, input: AdmissionInput) -> bool:
        """The order is approved: True once it holds a slot again, False while it waits for one
        (`Signals.SLOT_GRANTED` says when to ask again)."""

    @activity.defn
    @abstractmethod
    async def release_admission(self, input: AdmissionInput) -> None:
        """The lifecycle has ended: give the order's admission slot back for good (idempotent)."""


# --- OrderWorkflow ↔ ShippingWorkflow ------------------------------------------------------------
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
