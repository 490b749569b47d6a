"""The activities as the workflows call them (by reference, type-checked), and their models; the
workers' `BusinessActivities`, the tests' mocks and the bench subclass `OrderActivities`. No I/O."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import StrEnum

from pydantic import BaseModel
from temporalio import activity

from services.workers.steps import StepDone, StepRun, run_attempts
from shared.contracts import Address, OrderEvent, PlaceOrder

ORDER_INVALID = "OrderInvalid"  # ApplicationError type of a broken business rule: the order fails
PAYMENT_VOIDED = "PaymentVoided"  # ApplicationError type of a charge attempt that outlived its order


class PaymentInput(BaseModel):
    """A charge, or the refund of it."""

    order_id: str
    payment_id: str
    amount_cents: int


class ChargeOutcome(StrEnum):
    CHARGED = "charged"
    ALREADY_CHARGED = "already_charged"  # by an earlier attempt: the step ran again


class DispatchCarrierInput(BaseModel):
    order_id: str
    address: Address


class OrderActivities(ABC):
    """A business step is one local activity (`*_step`); each of its attempts calls the plain method."""

    @activity.defn
    async def receive_order_step(self, run: StepRun[PlaceOrder]) -> StepDone[None]:
        return await run_attempts(run, self.receive_order)

    @activity.defn
    async def validate_order_step(self, run: StepRun[str]) -> StepDone[None]:
        return await run_attempts(run, self.validate_order)

    @activity.defn
    async def charge_payment_step(self, run: StepRun[PaymentInput]) -> StepDone[ChargeOutcome]:
        return await run_attempts(run, self.charge_payment)

    @activity.defn
    async def prepare_package_step(self, run: StepRun[str]) -> StepDone[None]:
        return await run_attempts(run, self.prepare_package)

    @activity.defn
    async def dispatch_carrier_step(self, run: StepRun[DispatchCarrierInput]) -> StepDone[str]:
        return await run_attempts(run, self.dispatch_carrier)

    @activity.defn
    async def mark_shipped_step(self, run: StepRun[str]) -> StepDone[None]:
        return await run_attempts(run, self.mark_shipped)

    @abstractmethod
    async def receive_order(self, order: PlaceOrder) -> None: ...

    @abstractmethod
    async def validate_order(self, order_id: str) -> None: ...

    @abstractmethod
    async def charge_payment(self, payment: PaymentInput) -> ChargeOutcome: ...

    @abstractmethod
    async def prepare_package(self, order_id: str) -> None: ...

    @abstractmethod
    async def dispatch_carrier(self, dispatch: DispatchCarrierInput) -> str:
        """The tracking number."""

    @abstractmethod
    async def mark_shipped(self, order_id: str) -> None: ...

    @activity.defn
    @abstractmethod
    async def refund_payment(self, payment: PaymentInput) -> bool:
        """True if the payment is refunded; False if no charge had committed, which voids it."""

    @activity.defn
    @abstractmethod
    async def publish_events(self, events: list[OrderEvent]) -> None:
        """In order, each confirmed by the broker before the next."""

    @activity.defn
    @abstractmethod
    async def leave_admission_for_review(self, order_id: str) -> None:
        """The order waits for its reviewer: give its slot back meanwhile (idempotent)."""

    @activity.defn
    @abstractmethod
    async def resume_admission(self, order_id: str) -> bool:
        """The order is approved: True once it holds a slot again (`Signals.SLOT_FREED`: ask again)."""

    @activity.defn
    @abstractmethod
    async def release_admission(self, order_id: str) -> None:
        """The lifecycle has ended: give the order's admission slot back for good (idempotent)."""
