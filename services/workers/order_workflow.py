"""OrderWorkflow (task queue `order-tq`): one order's whole lifecycle.

    admitted → receive → validate → manual review → charge payment → ShippingWorkflow → mark shipped

Every order ends (completed, cancelled or failed) within its deadline, which counts the
lifecycle's own work and not the time its reviewer takes (the review window bounds that); while
the reviewer decides, the order's admission slot serves another order. A cancel
(a CancelOrder command, or a cancellation requested through Temporal) or the deadline stops the
lifecycle wherever it is, the child shipment is cancelled with it and a charged payment is
refunded; then the order's admission slot is given back. Each state change is an event on
`orders.events`, numbered by this workflow's outbox, the one place that knows the order's history
in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from services.workers.boundary import (
        ATTEMPT_ACTIVITIES,
        ORDER_INVALID,
        AdmissionInput,
        CarrierDispatched,
        ChargePaymentInput,
        ChargeResult,
        DispatchFailed,
        MarkShippedInput,
        OrderActivities,
        PackagePrepared,
        ReceiveOrderInput,
        RefundPaymentInput,
        ShippingInput,
        ShippingResult,
        ValidateOrderInput,
    )
    from services.workers.hedging import DEADLINE_EXCEEDED, deadline_reason
    from services.workers.outbox import Command, Outbox
    from services.workers.shipping_workflow import ShippingWorkflow
    from services.workers.steps import (
        STEP_IN_ONE_ACTIVITY_PATCH,
        AttemptLog,
        P,
        R,
        StepActivity,
        StepDeadlineExceeded,
        StepPolicy,
        run_step,
        run_step_per_attempt_activities,
    )
    from shared.authorization import FORBIDDEN, refusal
    from shared.contracts import (
        ApproveOrder,
        CancelOrder,
        EventType,
        OrderEvent,
        OrderState,
        OrderStatus,
        Step,
        UpdateAddress,
    )
    from shared.lifecycle import (
        EVENTS_QUERY,
        ORDER_WORKFLOW,
        STATUS_QUERY,
        WORKFLOW_TASK_TIMEOUT,
        OrderWorkflowInput,
        Signals,
    )

# Refund and what the lifecycle does with its admission slot are not fault-injected and must get
# through: one local activity each, retried in the worker with backoff until it succeeds. The
# backoff stays far below the local retry threshold (60 s), so Core never turns it into a timer.
MUST_GET_THROUGH: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=5),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2)
    ),
}


# lifecycles that began when the reviewer's time counted against the deadline keep it that way
REVIEW_OUTSIDE_DEADLINE_PATCH = "review-outside-deadline"
# and those that began when events went out in the shipment's start task, but kept their slot
# while in review, keep doing so
EVENTS_IN_SHIPMENT_START_PATCH = "lifecycle-events-in-shipment-start-task"
# Each patch a lifecycle takes costs two history events and a visibility write (Core upserts the
# TemporalChangeVersion search attribute), so one marker stands for every change up to giving the
# slot back during the review; a history without it asks for each earlier patch, as it was
# recorded.
LIFECYCLE_PATCH = "review-outside-admission"
SLOT_RECHECK = timedelta(seconds=5)
"""How often an approved order waiting for a slot asks again, should its wake-up be lost."""
T = TypeVar("T")
CANCELLED_THROUGH_TEMPORAL = "cancelled through Temporal (workflow cancellation request)"


@dataclass(frozen=True)
class Ending:
    """How a lifecycle that did not complete ends."""

    state: OrderState  # CANCELLED or FAILED
    reason: str
    command: CancelOrder | None = None


class LifecycleStopped(Exception):
    """Raised inside the lifecycle when a step decides the order cannot go on."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason)
        self.ending = ending


class ShippingPhase(StrEnum):
    PREPARING = "preparing"  # no package yet
    PACKAGE_READY = "package_ready"
    DISPATCHED = "dispatched"  # the carrier has it, for the order's current address


@dataclass
class Shipping:
    """The order's shipping: how far the package got, the running shipment, what failed."""

    phase: ShippingPhase = ShippingPhase.PREPARING
    shipments: int = 0
    current: workflow.ChildWorkflowHandle[ShippingWorkflow, ShippingResult] | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def step(self) -> Step:
        return Step.PREPARE_PACKAGE if self.phase is ShippingPhase.PREPARING else Step.DISPATCH_CARRIER


@workflow.defn(name=ORDER_WORKFLOW)
class OrderWorkflow:
    @workflow.init
    def __init__(self, start: OrderWorkflowInput) -> None:
        self._order = start.order
        self._policy = start.policy
        self._deadline = workflow.info().workflow_start_time + timedelta(
            seconds=start.policy.lifecycle_deadline_seconds
        )
        self._step_policy = StepPolicy.of(start.policy, self._deadline)
        now = workflow.now()
        self._status = OrderStatus(
            order_id=self._order.order_id,
            state=OrderState.RECEIVED,
            step=Step.RECEIVE,
            address=self._order.payload.address,
            payment_id=self._order.payload.payment_id,
            placed_by=self._order.issued_by.subject if self._order.issued_by else None,
            queued_at=start.queued_at,
            started_at=now,
            updated_at=now,
        )
        self._attempts = AttemptLog(self._order.order_id)
        self._outbox = Outbox(self._order, start.first_seq)
        self._shipping = Shipping()
        self._commands_seen: set[str] = set()
        self._approval: ApproveOrder | None = None
        self._stop_request: Ending | None = None
        self._ending = False
        self._charge_started = False
        self._review_began: datetime | None = None  # set while the order waits for its reviewer
        self._review_outside_deadline = False
        self._review_outside_admission = False
        self._slot_granted = False  # a freed slot went to this order while it waited for one
        self._step_in_one_activity = False
        self._admit(start)

    # --- the lifecycle ---------------------------------------------------------------------------
    @workflow.run
    async def run(self, start: OrderWorkflowInput) -> OrderStatus:
        self._review_outside_admission = workflow.patched(LIFECYCLE_PATCH)
        patched = self._review_outside_admission or workflow.patched(EVENTS_IN_SHIPMENT_START_PATCH)
        self._review_outside_deadline = patched or workflow.patched(REVIEW_OUTSIDE_DEADLINE_PATCH)
        self._step_in_one_activity = patched or workflow.patched(STEP_IN_ONE_ACTIVITY_PATCH)
        publisher = asyncio.create_task(self._outbox.publish(events_in_shipment_start=patched))
        lifecycle = asyncio.create_task(self._lifecycle())
        cancelled_through_temporal = False
        try:
            await self._until_ended_or_stopped(lifecycle)
        except asyncio.CancelledError:
            # an operator cancelled the workflow (CLI, UI, SDK): end it like a CancelOrder
            cancelled_through_temporal = True
            if self._stop_request is None:
                self._stop_request = Ending(OrderState.CANCELLED, CANCELLED_THROUGH_TEMPORAL)
                self._log_cancel(CANCELLED_THROUGH_TEMPORAL)
        conclusion = asyncio.create_task(self._conclude(lifecycle, publisher))
        while not conclusion.done():
            try:
                await asyncio.shield(conclusion)
            except asyncio.CancelledError:
                # a Temporal cancel while the order is already ending changes nothing: the refund,
                # the slot release and the last events must still happen
                cancelled_through_temporal = True
        if cancelled_through_temporal and self._status.state is OrderState.CANCELLED:
            raise asyncio.CancelledError  # Temporal shows the workflow as Canceled, as asked
        return self.status()

    async def _until_ended_or_stopped(self, lifecycle: asyncio.Task[None]) -> None:
        """Until the lifecycle ends, a stop is asked for, or the deadline passes: the lifecycle's
        own work has `lifecycle_deadline_seconds`, the time a reviewer takes does not count."""
        while True:
            try:
                await workflow.wait_condition(
                    lambda: lifecycle.done() or self._stop_request is not None,
                    timeout=self._time_left(),
                )
                return
            except TimeoutError:
                if self._review_outside_deadline and self._review_began is not None:
                    # the clock stops while the order waits for its reviewer
                    await workflow.wait_condition(
                        lambda: (
                            lifecycle.done() or self._stop_request is not None or self._review_began is None
                        )
                    )
                    continue
                if self._review_outside_deadline and self._time_left() > timedelta(0):
                    continue  # the deadline moved on by the reviewer's time
                reason = deadline_reason(self._status.step.value, self._policy.lifecycle_deadline_seconds)
                self._stop_request = Ending(OrderState.FAILED, reason)
                return

    async def _conclude(self, lifecycle: asyncio.Task[None], publisher: asyncio.Task[None]) -> None:
        ending = await self._ending_of(lifecycle)
        await self._finish(ending)
        await self._release_admission()
        self._outbox.close()
        await publisher
        # a command that lands while the order ends is answered (rejected) before completing
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._outbox.publish()

    async def _lifecycle(self) -> None:
        order_id = self._order.order_id
        await self._step(
            Step.RECEIVE, OrderActivities.receive_order_step, ReceiveOrderInput(order=self._order)
        )
        self._reach(OrderState.RECEIVED, EventType.RECEIVED, placed_by=self._status.placed_by)

        await self._step(
            Step.VALIDATE, OrderActivities.validate_order_step, ValidateOrderInput(order_id=order_id)
        )
        self._reach(OrderState.VALIDATED, EventType.VALIDATED)

        await self._review()

        charge = await self._charge_payment()
        self._reach(
            OrderState.PAID,
            EventType.PAYMENT_CHARGED,
            amount_cents=self._order.payload.amount_cents,
            already_charged=charge.already_charged,
        )

        tracking_number = await self._ship()
        self._status.tracking_number = tracking_number

        await self._step(
            Step.MARK_SHIPPED, OrderActivities.mark_shipped_step, MarkShippedInput(order_id=order_id)
        )
        self._reach(OrderState.SHIPPED, EventType.SHIPPED, tracking_number=tracking_number)

    def _admit(self, start: OrderWorkflowInput) -> None:
        """The first event, then the commands that reached the order while it waited for a slot."""
        wait = None
        if start.queued_at is not None:
            waited = workflow.info().workflow_start_time - start.queued_at
            wait = round(max(waited.total_seconds(), 0.0), 3)
        self._reach(
            OrderState.RECEIVED,
            EventType.ADMITTED,
            queued_at=start.queued_at.isoformat() if start.queued_at else None,
            admission_wait_seconds=wait,
        )
        for command in start.early_commands:
            if isinstance(command, ApproveOrder):
                self.approve(command)
            else:
                self._change_address(command)

    async def _review(self) -> None:
        self._status.step = Step.REVIEW
        window = self._policy.review_window_seconds
        self._reach(OrderState.AWAITING_APPROVAL, EventType.AWAITING_APPROVAL, review_window_seconds=window)
        self._review_began = workflow.now()
        left_slot = False
        if self._review_outside_admission and self._approval is None:
            left_slot = await self._leave_slot_unless_approved_soon()
        # not in a `finally`: a workflow evicted from the cache closes this coroutine outside the
        # workflow's event loop, where the clock cannot be read
        try:
            await workflow.wait_condition(
                lambda: self._approval is not None, timeout=window - self._review_seconds()
            )
        except TimeoutError:
            self._end_review()
            raise LifecycleStopped(Ending(OrderState.CANCELLED, "review_timeout")) from None
        if left_slot:
            await self._regain_slot()
        self._end_review()
        if self._status.state is OrderState.AWAITING_APPROVAL:
            self._record_approval()

    async def _leave_slot_unless_approved_soon(self) -> bool:
        """A person may take minutes, during which the slot serves another order; an approval
        that comes at once (a reviewing service, say) keeps it, without handing it over twice.
        True if it gave the slot back."""
        grace = min(self._policy.review_slot_grace_seconds, self._policy.review_window_seconds)
        with suppress(TimeoutError):
            await workflow.wait_condition(lambda: self._approval is not None, timeout=grace)
        if self._approval is not None or self._review_seconds() >= self._policy.review_window_seconds:
            return False
        await self._admission(OrderActivities.leave_admission_for_review)
        return True

    def _review_seconds(self) -> float:
        assert self._review_began is not None
        return (workflow.now() - self._review_began).total_seconds()

    async def _regain_slot(self) -> None:
        """Approved: go on once the order holds a slot again. It comes before any waiting
        placement, and the time it waits counts as the review's, not against the deadline."""
        began = workflow.now()
        waited = False
        while True:
            self._slot_granted = False  # before asking: a grant arriving meanwhile is not missed
            if await self._admission(OrderActivities.resume_admission):
                break
            if not waited:
                self._log_admission("waiting for a slot to go on", began)
                self._status.waiting_for_slot_since = began
                waited = True
            with suppress(TimeoutError):
                await workflow.wait_condition(lambda: self._slot_granted, timeout=SLOT_RECHECK)
        if waited:
            self._status.waiting_for_slot_since = None
            self._log_admission("slot regained", began)

    def _log_admission(self, message: str, began: datetime) -> None:
        workflow.logger.info(
            message,
            extra={
                "order_id": self._order.order_id,
                "step": self._status.step.value,
                "waited_seconds": round((workflow.now() - began).total_seconds(), 3),
            },
        )

    def _end_review(self) -> None:
        assert self._review_began is not None
        if self._review_outside_deadline:
            self._deadline += workflow.now() - self._review_began
            self._step_policy = StepPolicy.of(self._policy, self._deadline)
        self._review_began = None

    def _record_approval(self) -> None:
        approval = self._approval
        assert approval is not None
        # whom the bridge verified: a command gets here only with its issuer
        self._status.approved_by = approval.issued_by.subject if approval.issued_by else None
        self._reach(
            OrderState.APPROVED,
            EventType.APPROVED,
            command=approval,
            approved_by=self._status.approved_by,
            note=approval.payload.note,
        )

    async def _charge_payment(self) -> ChargeResult:
        # from here on a stop refunds: an attempt cut short may still have charged
        self._charge_started = True
        charge = ChargePaymentInput(
            order_id=self._order.order_id,
            payment_id=self._order.payload.payment_id,
            amount_cents=self._order.payload.amount_cents,
        )
        return await self._step(Step.CHARGE_PAYMENT, OrderActivities.charge_payment_step, charge)

    async def _ship(self) -> str:
        """Run ShippingWorkflow until one dispatches to the order's current address; each
        DispatchFailed is one more try, up to the policy's bound."""
        failures = 0
        while failures < self._policy.max_shipping_attempts:
            self._shipping.shipments += 1
            self._status.shipping_attempts = self._shipping.shipments
            self._status.step = self._shipping.step
            self._reach(
                OrderState.SHIPPING, EventType.SHIPPING_STARTED, shipping_attempt=self._shipping.shipments
            )
            result = await self._run_shipment()
            if result.dispatched is None:
                failures += 1
            elif self._record_dispatch(result.dispatched):
                return result.dispatched.tracking_number
            # else an address update was accepted while this shipment was dispatching: the
            # carrier has the old address, so dispatch again (the tracking number is kept)
        reason = f"dispatch failed {self._policy.max_shipping_attempts} times"
        if self._shipping.failures:
            reason += f"; last: {self._shipping.failures[-1]}"
        raise LifecycleStopped(Ending(OrderState.FAILED, reason))

    async def _run_shipment(self) -> ShippingResult:
        shipping = self._shipping
        # its start, or its failure to start, is sure to bring the next workflow task
        self._outbox.next_task_sure()
        shipping.current = await workflow.start_child_workflow(
            ShippingWorkflow.run,
            ShippingInput(
                order_id=self._order.order_id,
                parent_workflow_id=workflow.info().workflow_id,
                address=self._status.address,
                package_ready=shipping.phase is not ShippingPhase.PREPARING,
                policy=self._policy,
                deadline=self._deadline,
            ),
            id=f"{workflow.info().workflow_id}-shipping-{shipping.shipments}",
            task_queue=self._policy.shipping_task_queue,
            task_timeout=WORKFLOW_TASK_TIMEOUT,
        )
        try:
            result = await shipping.current
        except ChildWorkflowError as err:
            if self._ending:
                raise  # we cancelled it: the order is stopping, not shipping again
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.type == DEADLINE_EXCEEDED:
                raise LifecycleStopped(Ending(OrderState.FAILED, cause.message)) from err
            # a shipment that broke rather than reported: counts as one failed dispatch
            shipping.failures.append(str(cause or err))
            return ShippingResult()
        finally:
            shipping.current = None
        if self._ending:
            # it ended before it saw our cancel (its task was busy with attempts), which the SDK
            # then drops: record what the carrier got, and stop as asked
            if result.dispatched is not None:
                self._record_dispatch(result.dispatched)
            raise asyncio.CancelledError()
        return result

    def _record_dispatch(self, dispatched: CarrierDispatched) -> bool:
        """The carrier has the package; True if for the order's current address."""
        self._attempts.merge(dispatched.dispatch)
        self._emit(
            EventType.CARRIER_DISPATCHED,
            tracking_number=dispatched.tracking_number,
            address=dispatched.address.model_dump(),
        )
        if dispatched.address != self._status.address:
            return False
        self._shipping.phase = ShippingPhase.DISPATCHED
        return True

    # --- how it ends -----------------------------------------------------------------------------
    async def _ending_of(self, lifecycle: asyncio.Task[None]) -> Ending | None:
        """Stop the lifecycle if a cancel or the deadline came first; None means it completed."""
        self._ending = True
        if not lifecycle.done():
            lifecycle.cancel()
            # stopped on purpose; the stop request says why
            with suppress(asyncio.CancelledError, ApplicationError, ChildWorkflowError, LifecycleStopped):
                await lifecycle
            return self._stop_request
        try:
            lifecycle.result()
        except LifecycleStopped as stopped:
            return stopped.ending
        return None

    async def _finish(self, ending: Ending | None) -> None:
        if ending is None:
            self._status.step = Step.DONE
            self._reach(OrderState.COMPLETED, EventType.COMPLETED)
            return
        refunded = await self._refund() if self._charge_started else False
        self._status.step = Step.DONE
        self._status.refunded = refunded
        self._status.reason = ending.reason
        if ending.state is OrderState.CANCELLED:
            self._reach(
                OrderState.CANCELLED,
                EventType.CANCELLED,
                command=ending.command,
                reason=ending.reason,
                refunded=refunded,
            )
        else:
            self._reach(OrderState.FAILED, EventType.FAILED, reason=ending.reason, refunded=refunded)

    async def _refund(self) -> bool:
        self._status.step = Step.REFUND
        refund = RefundPaymentInput(
            order_id=self._order.order_id,
            payment_id=self._order.payload.payment_id,
            amount_cents=self._order.payload.amount_cents,
        )
        with self._outbox.gathering():
            return await workflow.execute_local_activity_method(
                OrderActivities.refund_payment, refund, **MUST_GET_THROUGH
            )

    async def _release_admission(self) -> None:
        """The lifecycle has ended: give its admission slot back, or capacity is lost for good."""
        await self._admission(OrderActivities.release_admission)

    async def _admission(self, activity: Callable[[OrderActivities, AdmissionInput], Awaitable[T]]) -> T:
        """What the lifecycle does with its admission slot: a local activity that gets through."""
        with self._outbox.gathering():
            return await workflow.execute_local_activity_method(
                activity, AdmissionInput(order_id=self._order.order_id), **MUST_GET_THROUGH
            )

    # --- commands (signals from the bridge, or early commands at the start) ----------------------
    @workflow.signal(name=Signals.APPROVE)
    def approve(self, command: ApproveOrder) -> None:
        if self._accept(command, self._approve_blocked()):
            self._approval = command
            # in review, record it now, so its event comes before anything later in this task;
            # an early approval waits for the review step
            if self._status.state is OrderState.AWAITING_APPROVAL:
                self._record_approval()

    @workflow.signal(name=Signals.CANCEL)
    def cancel(self, command: CancelOrder) -> None:
        if self._accept(command, self._change_blocked()):
            reason = command.payload.reason or "cancelled on request"
            self._stop_request = Ending(OrderState.CANCELLED, reason, command)
            self._log_cancel(reason)

    def _log_cancel(self, reason: str) -> None:
        workflow.logger.info(
            "cancel requested",
            extra={"order_id": self._order.order_id, "step": self._status.step.value, "reason": reason},
        )

    @workflow.signal(name=Signals.UPDATE_ADDRESS)
    async def update_address(self, command: UpdateAddress) -> None:
        if not self._change_address(command):
            return
        shipment = self._shipping.current
        if shipment is not None:
            try:
                await shipment.signal(ShippingWorkflow.update_address, command.payload.address)
            except ApplicationError as err:
                # the shipment ended meanwhile; the next one, if any, starts with the new address
                if err.type != "ExternalWorkflowExecutionNotFound":
                    raise

    def _change_address(self, command: UpdateAddress) -> bool:
        if not self._accept(command, self._change_blocked()):
            return False
        address = command.payload.address
        self._status.address = address
        self._emit(EventType.ADDRESS_UPDATED, command=command, address=address.model_dump())
        return True

    def _approve_blocked(self) -> str | None:
        if self._approval is not None:
            return "order already approved"
        return self._change_blocked()

    def _change_blocked(self) -> str | None:
        if self._ending or self._stop_request is not None:
            return "order has ended or is ending"
        if self._shipping.phase is ShippingPhase.DISPATCHED:
            return "order already dispatched"
        return None

    def _accept(self, command: Command, blocked: str | None) -> bool:
        """True if the command is new and may apply; a duplicate is ignored, one its issuer may
        not send rejected as `forbidden`, a blocked one rejected."""
        command_id = str(command.command_id)
        if command_id in self._commands_seen:
            workflow.logger.info(
                "duplicate command ignored",
                extra={"order_id": self._order.order_id, "command_id": command_id},
            )
            return False
        self._commands_seen.add(command_id)
        in_review = self._status.state is OrderState.AWAITING_APPROVAL
        why = refusal(command.type, command.issued_by, self._status.placed_by, in_review)
        if why is not None:
            self._reject(command, FORBIDDEN, detail=why)
            return False
        if blocked is None:
            return True
        self._reject(command, blocked)
        return False

    def _reject(self, command: Command, reason: str, **explained: str) -> None:
        self._emit(
            EventType.COMMAND_REJECTED,
            command=command,
            command_type=command.type.value,
            reason=reason,
            **explained,
        )
        workflow.logger.warning(
            "command rejected",
            extra={
                "order_id": self._order.order_id,
                "command_id": str(command.command_id),
                "command_type": command.type.value,
                "reason": reason,
                **explained,
            },
        )

    @workflow.signal(name=Signals.SLOT_GRANTED)
    def slot_granted(self) -> None:
        """A wake-up, not a grant: the order asks the ledger whether it holds a slot."""
        self._slot_granted = True

    # --- progress reports from the shipping child ------------------------------------------------
    @workflow.signal(name=Signals.PACKAGE_PREPARED)
    def on_package_prepared(self, prepared: PackagePrepared) -> None:
        self._attempts.merge(prepared.prepare)
        self._shipping.phase = ShippingPhase.PACKAGE_READY
        self._status.step = self._shipping.step
        self._emit(EventType.PACKAGE_PREPARED)
        # the dispatch follows in a moment: this shipment's outcome and this go out together
        shipment = self._shipping.current
        self._outbox.hold_until(lambda: self._shipping.current is not shipment)

    @workflow.signal(name=Signals.DISPATCH_FAILED)
    def on_dispatch_failed(self, failed: DispatchFailed) -> None:
        self._attempts.merge(failed.dispatch)
        self._shipping.failures.append(failed.reason)
        self._emit(EventType.DISPATCH_FAILED, reason=failed.reason, shipping_attempt=self._shipping.shipments)
        workflow.logger.warning(
            "dispatch failed",
            extra={
                "order_id": self._order.order_id,
                "step": Step.DISPATCH_CARRIER.value,
                "attempt": self._shipping.shipments,
                "error": failed.reason,
            },
        )

    @workflow.query(name=EVENTS_QUERY)
    def events(self) -> list[OrderEvent]:
        """Every event this lifecycle emitted, published or not: after a termination the bridge's
        reconciler publishes what the workflow could not, then says how the order ended."""
        return list(self._outbox.emitted)

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> OrderStatus:
        return self._status.model_copy(
            update={"attempts": dict(self._attempts.attempts), "recent_errors": list(self._attempts.errors)}
        )

    # --- helpers ---------------------------------------------------------------------------------
    async def _step(self, step: Step, activity: StepActivity[P, R], arg: P) -> R:
        self._status.step = step
        try:
            with self._outbox.gathering():
                if self._step_in_one_activity:
                    return await run_step(
                        step, activity, arg, policy=self._step_policy, attempts=self._attempts
                    )
                attempt: Any = ATTEMPT_ACTIVITIES[step]
                return await run_step_per_attempt_activities(
                    step, attempt, arg, policy=self._step_policy, on_attempt=self._attempts
                )
        except StepDeadlineExceeded as exceeded:
            raise LifecycleStopped(Ending(OrderState.FAILED, exceeded.message)) from exceeded
        except ApplicationError as err:
            if err.type == ORDER_INVALID:
                raise LifecycleStopped(Ending(OrderState.FAILED, f"invalid order: {err.message}")) from err
            raise

    def _reach(
        self, state: OrderState, event: EventType, command: Command | None = None, **data: Any
    ) -> None:
        """A state transition: status, event and log line together."""
        self._status.state = state
        self._emit(event, command=command, **data)
        workflow.logger.info(
            "state transition",
            extra={
                "order_id": self._order.order_id,
                "state": state.value,
                "step": self._status.step.value,
                "seq": self._outbox.last_seq,
            },
        )

    def _emit(self, event_type: EventType, command: Command | None = None, **data: Any) -> None:
        event = self._outbox.emit(event_type, command, **data)
        self._status.updated_at = event.occurred_at
        if event_type.is_terminal:
            self._status.finished_at = event.occurred_at

    def _time_left(self) -> timedelta:
        return max(self._deadline - workflow.now(), timedelta(0))
