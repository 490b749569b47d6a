"""What OrderWorkflow and its ShippingWorkflow child exchange (outside the workflow modules, so the
sandbox imports it once)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from services.workers.steps import StepAttempts
from shared.contracts import Address
from shared.lifecycle import LifecyclePolicy


class ShippingInput(BaseModel):
    order_id: str
    parent_workflow_id: str
    address: Address
    package_ready: bool
    policy: LifecyclePolicy
    deadline: datetime  # the lifecycle's: a step still running then gives up


class DispatchFailed(BaseModel):
    """Signal to the parent: this shipment could not dispatch; the parent decides what next."""

    reason: str
    dispatch: StepAttempts


class CarrierDispatched(BaseModel):
    """The carrier has the package: the tracking number and the address it was given."""

    tracking_number: str
    address: Address
    dispatch: StepAttempts
