"""The parts of OrderWorkflow's state: why it stops, its deadline, the order's record (status and
events), which commands apply, and its shipments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from temporalio import workflow
from temporalio.exceptions import ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from services.workers import visibility
    from services.workers.activity_interface import PaymentInput
    from services.workers.outbox import Command, Outbox
    from services.workers.shipment import CarrierDispatched, DispatchFailed, ShippingInput
    from services.workers.shipping_workflow import ShippingWorkflow
    from services.workers.steps import DEADLINE_EXCEEDED, AttemptLog, StepAttempts
    from shared.authorization import FORBIDDEN, refusal
    from shared.contracts import (
        AdmittedData,
        CancelOrder,
        CarrierDispatchedData,
        CommandRejectedData,
        DispatchFailedData,
        EventPayload,
        OrderState,
        OrderStatus,
        PackagePreparedData,
        ShippingStartedData,
        Step,
    )
    from shared.lifecycle import WORKFLOW_TASK_TIMEOUT, LifecyclePolicy, OrderWorkflowInput

# a stop in these steps has no payment to refund
BEFORE_PAYMENT = frozenset({Step.RECEIVE, Step.VALIDATE, Step.REVIEW})


class Phase(StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"  # a cancel or the deadline asked the lifecycle to stop
    CONCLUDING = "concluding"  # the lifecycle is over: refund, slot release, last events


class Stop(Exception):
    """Why a lifecycle that did not complete stops; raised inside it when the order cannot go on."""

    def __init__(self, state: OrderState, reason: str, command: CancelOrder | None = None) -> None:
        super().__init__(reason)
        self.state = state  # CANCELLED or FAILED
        self.reason = reason
        self.command = command


@dataclass
class Deadline:
    """The lifecycle's own time runs out at `at`; a review pauses it."""

    at: datetime
    paused_at: datetime | None = None

    def left(self) -> timedelta:
        return max(self.at - workflow.now(), timedelta(0))

    def pause(self) -> None:
        self.paused_at = workflow.now()

    def resume(self) -> None:
        assert self.paused_at is not None
        self.at += workflow.now() - self.paused_at
        self.paused_at = None

    def paused_seconds(self) -> float:
        assert self.paused_at is not None
        return (workflow.now() - self.paused_at).total_seconds()

    async def passes_before(self, done: Callable[[], bool]) -> bool:
        """Wait until `done()` (False) or the deadline passes (True)."""
        while True:
            try:
                await workflow.wait_condition(done, timeout=self.left())
                return False
            except TimeoutError:
                if self.paused_at is not None:  # the clock stops while the reviewer decides
                    await workflow.wait_condition(lambda: done() or self.paused_at is None)
                elif self.left() == timedelta(0):
                    return True


class ShippingPhase(StrEnum):
    PREPARING = "preparing"  # no package yet
    PACKAGE_READY = "package_ready"
    DISPATCHED = "dispatched"  # the carrier has it, for the order's current address


class OrderRecord:
    """The order's status and its events, changed together; which commands apply: a duplicate is
    ignored, one its issuer may not send (`forbidden`) or the lifecycle no longer takes is rejected."""

    def __init__(self, start: OrderWorkflowInput) -> None:
        order = start.order
        now = workflow.now()
        self.status = OrderStatus(
            order_id=order.order_id,
            state=OrderState.RECEIVED,
            step=Step.RECEIVE,
            address=order.payload.address,
            payment_id=order.payload.payment_id,
            placed_by=order.issued_by.subject if order.issued_by else None,
            queued_at=start.queued_at,
            started_at=now,
            updated_at=now,
        )
        amount_cents = order.payload.amount_cents
        self.outbox = Outbox(
            order, start.first_seq, on_batch=lambda: visibility.show_state(self.status, amount_cents)
        )
        self.attempts = AttemptLog(order.order_id)
        self.payment = PaymentInput(
            order_id=order.order_id, payment_id=order.payload.payment_id, amount_cents=amount_cents
        )
        self._seen_commands: set[str] = set()

    def advance(self, state: OrderState, data: EventPayload, command: Command | None = None) -> None:
        """A state change: status, event, what Temporal shows and a log line together."""
        self.status.state = state
        self.emit(data, command=command)
        visibility.show_details(self.status)
        extra = {"order_id": self.status.order_id, "state": state.value, "step": self.status.step.value}
        workflow.logger.info("state transition", extra=extra | {"seq": self.outbox.last_seq})

    def emit(self, data: EventPayload, command: Command | None = None) -> None:
        event = self.outbox.emit(data, command)
        self.status.updated_at = event.occurred_at
        if event.type.is_terminal:
            self.status.finished_at = event.occurred_at

    def admitted(self, start: OrderWorkflowInput) -> None:
        wait = None
        if start.queued_at is not None:
            waited = workflow.info().workflow_start_time - start.queued_at
            wait = round(max(waited.total_seconds(), 0.0), 3)
        self.advance(
            OrderState.RECEIVED, AdmittedData(queued_at=start.queued_at, admission_wait_seconds=wait)
        )

    def snapshot(self) -> OrderStatus:
        return self.status.model_copy(
            update={"attempts": dict(self.attempts.attempts), "recent_errors": list(self.attempts.errors)}
        )

    def accept(self, command: Command, blocked: str | None) -> bool:
        """True if the command is new and may apply; `blocked` says why the lifecycle refuses it."""
        command_id = str(command.command_id)
        if command_id in self._seen_commands:
            extra = {"order_id": self.status.order_id, "command_id": command_id}
            workflow.logger.info("duplicate command ignored", extra=extra)
            return False
        self._seen_commands.add(command_id)
        in_review = self.status.state is OrderState.AWAITING_APPROVAL
        why = refusal(command.type, command.issued_by, self.status.placed_by, in_review)
        if why is not None:
            self._reject(command, FORBIDDEN, why)
        elif blocked is not None:
            self._reject(command, blocked)
        return why is None and blocked is None

    def _reject(self, command: Command, reason: str, detail: str | None = None) -> None:
        rejected = CommandRejectedData(command_type=command.type, reason=reason, detail=detail)
        self.emit(rejected, command)
        extra = {"order_id": self.status.order_id, "command_id": str(command.command_id)}
        workflow.logger.warning("command rejected", extra=extra | rejected.model_dump(mode="json"))


class Shipping:
    """The order's shipments: how far the package got, the running one, what failed."""

    def __init__(self, record: OrderRecord, policy: LifecyclePolicy) -> None:
        self.phase = ShippingPhase.PREPARING
        self.shipments = 0
        self.current: workflow.ChildWorkflowHandle[ShippingWorkflow, CarrierDispatched | None] | None = None
        self.failures: list[str] = []
        self._record = record
        self._policy = policy

    @property
    def step(self) -> Step:
        return Step.PREPARE_PACKAGE if self.phase is ShippingPhase.PREPARING else Step.DISPATCH_CARRIER

    async def run(self, deadline: datetime, cancelled: Callable[[], bool]) -> CarrierDispatched | None:
        """Run one more ShippingWorkflow; one that broke rather than reported counts as a failed dispatch."""
        self.shipments += 1
        status = self._record.status
        status.shipping_attempts, status.step = self.shipments, self.step
        self._record.advance(OrderState.SHIPPING, ShippingStartedData(shipping_attempt=self.shipments))
        self._record.outbox.publish_in_next_task()  # the child's start, or its failure, brings that task
        parent = workflow.info().workflow_id
        shipment = ShippingInput(
            order_id=status.order_id,
            parent_workflow_id=parent,
            address=status.address,
            package_ready=self.phase is not ShippingPhase.PREPARING,
            policy=self._policy,
            deadline=deadline,
        )
        self.current = await workflow.start_child_workflow(
            ShippingWorkflow.run,
            shipment,
            id=f"{parent}-shipping-{self.shipments}",
            task_queue=self._policy.shipping_task_queue,
            task_timeout=WORKFLOW_TASK_TIMEOUT,
        )
        try:
            return await self.current
        except ChildWorkflowError as err:
            if cancelled():
                raise  # the order is stopping, not shipping again
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.type == DEADLINE_EXCEEDED:
                raise Stop(OrderState.FAILED, cause.message) from err
            self.failures.append(str(cause or err))
            return None
        finally:
            self.current = None

    def package_ready(self, prepare: StepAttempts) -> None:
        self._record.attempts.merge(prepare)
        self.phase = ShippingPhase.PACKAGE_READY
        self._record.status.step = self.step
        self._record.emit(PackagePreparedData())
        # the dispatch follows in a moment: this shipment's outcome and this go out together
        shipment = self.current
        self._record.outbox.hold_until(lambda: self.current is not shipment)

    def dispatch_failed(self, failed: DispatchFailed) -> None:
        self._record.attempts.merge(failed.dispatch)
        self.failures.append(failed.reason)
        self._record.emit(DispatchFailedData(reason=failed.reason, shipping_attempt=self.shipments))
        extra = {"order_id": self._record.status.order_id, "step": Step.DISPATCH_CARRIER.value}
        workflow.logger.warning(
            "dispatch failed", extra=extra | {"attempt": self.shipments, "error": failed.reason}
        )

    def dispatched(self, dispatched: CarrierDispatched) -> bool:
        """The carrier has the package; True if for the order's current address."""
        self._record.attempts.merge(dispatched.dispatch)
        address = dispatched.address
        self._record.emit(CarrierDispatchedData(tracking_number=dispatched.tracking_number, address=address))
        if address != self._record.status.address:
            return False
        self.phase = ShippingPhase.DISPATCHED
        return True
