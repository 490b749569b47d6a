"""How the outside world addresses an order's workflow: ids, names and the start input. The bridge
starts and signals workflows with these, the workers implement them; free of I/O for the sandbox."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, Field

from shared.contracts import ApproveOrder, PlaceOrder, UpdateAddress

ORDER_WORKFLOW = "OrderWorkflow"
SHIPPING_WORKFLOW = "ShippingWorkflow"


class Signals:
    """Signal names of `OrderWorkflow` (commands) and of `ShippingWorkflow`."""

    APPROVE = "approve"
    CANCEL = "cancel"
    UPDATE_ADDRESS = "update_address"
    # a slot was freed: the approved order waiting for one asks again (shared/admission_table.py)
    SLOT_FREED = "slot_freed"
    # child -> parent
    PACKAGE_PREPARED = "package_prepared"
    DISPATCH_FAILED = "dispatch_failed"


STATUS_QUERY = "status"
EVENTS_QUERY = "events"
"""Every event the lifecycle emitted so far (a list of `OrderEvent`), published or not."""

WORKFLOW_TASK_TIMEOUT = timedelta(seconds=3)
"""Of orders and their shipments: bounds a signal's wait during a long step and a dead worker's
hand-over, and leaves a busy machine time to answer (docs/design.md)."""


def order_workflow_id(order_id: str) -> str:
    return f"order-{order_id}"


def order_summary(order: PlaceOrder) -> str:
    """The workflow's summary in Temporal's UI (its `static_summary`, sealed by the payload codec)."""
    placed_by = order.issued_by.subject if order.issued_by else "an unverified issuer"
    lines, amount = len(order.payload.items), order.payload.amount_cents / 100
    return f"order {order.order_id}: {lines} line(s), {amount:.2f} in total, placed by {placed_by}"


class LifecyclePolicy(BaseModel):
    """Timing and bounds of one lifecycle, fixed when it starts (from `Settings`)."""

    review_window_seconds: float
    review_slot_grace_seconds: float = 1.0  # an input from before it had none (and never uses it)
    lifecycle_deadline_seconds: float
    max_shipping_attempts: int
    activity_attempt_timeout_seconds: float
    parallel_attempts: int
    dispatch_attempts_per_shipment: int
    shipping_task_queue: str


EarlyCommand = Annotated[ApproveOrder | UpdateAddress, Field(discriminator="type")]
"""A command that reached an order while it waited for admission; it applies as the lifecycle starts."""


class OrderWorkflowInput(BaseModel):
    order: PlaceOrder
    policy: LifecyclePolicy
    queued_at: datetime | None = None
    """When the bridge took the placement in (None: started without waiting)."""
    first_seq: int = 1
    """The seq of the workflow's first event: the bridge numbered the ones before (`queued`)."""
    early_commands: list[EarlyCommand] = []
    """Commands accepted while the order waited, in arrival order (the workflow de-duplicates)."""
