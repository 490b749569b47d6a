"""OrderWorkflow (task queue `order-tq`): one order's whole lifecycle.

    receive → validate → manual review → charge payment → ShippingWorkflow → mark shipped

Every order ends (completed, cancelled or failed) within its deadline: a cancel request or the
deadline stops the lifecycle wherever it is, the child shipment is cancelled with it and a charged
payment is refunded. Each state change is an event on `orders.events`, numbered 1, 2, 3, ... by
this workflow, which is the one place that knows the order's history in order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from services.workers.steps import (
        ORDER_INVALID,
        Activities,
        AttemptLog,
        ChargeRequest,
        ChargeResult,
        ShippingInput,
        ShippingResult,
        StepPolicy,
        StepReport,
        run_step,
    )
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
        ORDER_WORKFLOW,
        SHIPPING_WORKFLOW,
        STATUS_QUERY,
        OrderWorkflowInput,
        Signals,
    )

Command = ApproveOrder | CancelOrder | UpdateAddress

PUBLISH_TIMEOUT = timedelta(seconds=5)
# publishing must get through eventually: retried without limit while the broker is away
PUBLISH_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2)
)


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


@workflow.defn(name=ORDER_WORKFLOW)
class OrderWorkflow:
    @workflow.init
    def __init__(self, start: OrderWorkflowInput) -> None:
        self._order = start.order
        self._policy = start.policy
        self._step_policy = StepPolicy.of(start.policy)
        now = workflow.now()
        self._status = OrderStatus(
            order_id=self._order.order_id,
            state=OrderState.RECEIVED,
            step=Step.RECEIVE,
            address=self._order.payload.address,
            payment_id=self._order.payload.payment_id,
            started_at=now,
            updated_at=now,
        )
        self._attempts = AttemptLog(self._order.order_id)
        self._seq = 0
        self._outbox: list[OrderEvent] = []
        self._commands_seen: set[str] = set()
        self._approval: ApproveOrder | None = None
        self._stop_request: Ending | None = None
        self._ending = False
        self._closing = False
        self._charge_started = False
        self._package_ready = False
        self._dispatched = False
        self._shipment: workflow.ChildWorkflowHandle[Any, ShippingResult] | None = None
        self._dispatch_failures: list[str] = []

    # --- the lifecycle ---------------------------------------------------------------------------
    @workflow.run
    async def run(self, start: OrderWorkflowInput) -> OrderStatus:
        publisher = asyncio.create_task(self._publish_events())
        lifecycle = asyncio.create_task(self._lifecycle())
        try:
            await workflow.wait_condition(
                lambda: lifecycle.done() or self._stop_request is not None,
                timeout=self._time_left(),
            )
        except TimeoutError:
            self._stop_request = Ending(OrderState.FAILED, "deadline_exceeded")
        ending = await self._ending_of(lifecycle)
        await self._finish(ending)
        self._closing = True
        await publisher
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    async def _lifecycle(self) -> None:
        await self._step(Step.RECEIVE, Activities.RECEIVE_ORDER, self._order)
        self._reach(OrderState.RECEIVED, EventType.RECEIVED)

        await self._step(Step.VALIDATE, Activities.VALIDATE_ORDER, self._order.order_id)
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

        await self._step(Step.MARK_SHIPPED, Activities.MARK_SHIPPED, self._order.order_id)
        self._reach(OrderState.SHIPPED, EventType.SHIPPED, tracking_number=tracking_number)

    async def _review(self) -> None:
        self._status.step = Step.REVIEW
        window = self._policy.review_window_seconds
        self._reach(OrderState.AWAITING_APPROVAL, EventType.AWAITING_APPROVAL, review_window_seconds=window)
        try:
            await workflow.wait_condition(lambda: self._approval is not None, timeout=window)
        except TimeoutError:
            raise LifecycleStopped(Ending(OrderState.CANCELLED, "review_timeout")) from None
        if self._status.state is OrderState.AWAITING_APPROVAL:
            self._record_approval()

    def _record_approval(self) -> None:
        approval = self._approval
        assert approval is not None
        self._reach(
            OrderState.APPROVED,
            EventType.APPROVED,
            command=approval,
            reviewer=approval.payload.reviewer,
            note=approval.payload.note,
        )

    async def _charge_payment(self) -> ChargeResult:
        # from here on a stop refunds: an attempt cut short may still have charged
        self._charge_started = True
        request = ChargeRequest(
            order_id=self._order.order_id,
            payment_id=self._order.payload.payment_id,
            amount_cents=self._order.payload.amount_cents,
        )
        return await self._step(
            Step.CHARGE_PAYMENT, Activities.CHARGE_PAYMENT, request, result_type=ChargeResult
        )

    async def _ship(self) -> str:
        """Run ShippingWorkflow until one dispatches to the order's current address; each
        DispatchFailed is one more try, up to the policy's bound."""
        shipment = failures = 0
        while failures < self._policy.max_shipping_attempts:
            shipment += 1
            self._status.shipping_attempts = shipment
            self._status.step = Step.DISPATCH_CARRIER if self._package_ready else Step.PREPARE_PACKAGE
            self._reach(OrderState.SHIPPING, EventType.SHIPPING_STARTED, shipping_attempt=shipment)
            result = await self._run_shipment(shipment)
            if not (result.dispatched and result.tracking_number):
                failures += 1
            elif result.address in (None, self._status.address):
                return result.tracking_number
            # else an address update was accepted while this dispatch was being reported: the
            # carrier has the old address, so dispatch again (the tracking number is kept)
        reason = f"dispatch failed {self._policy.max_shipping_attempts} times"
        if self._dispatch_failures:
            reason += f"; last: {self._dispatch_failures[-1]}"
        raise LifecycleStopped(Ending(OrderState.FAILED, reason))

    async def _run_shipment(self, attempt: int) -> ShippingResult:
        self._shipment = await workflow.start_child_workflow(
            SHIPPING_WORKFLOW,
            ShippingInput(
                order_id=self._order.order_id,
                parent_workflow_id=workflow.info().workflow_id,
                address=self._status.address,
                package_ready=self._package_ready,
                policy=self._policy,
            ),
            id=f"{workflow.info().workflow_id}-shipping-{attempt}",
            task_queue=self._policy.shipping_task_queue,
            result_type=ShippingResult,
        )
        try:
            return await self._shipment
        except ChildWorkflowError as err:
            if self._ending:
                raise  # we cancelled it: the order is stopping, not shipping again
            # a shipment that broke rather than reported: counts as one failed dispatch
            self._dispatch_failures.append(str(err.cause or err))
            return ShippingResult(dispatched=False, failure=str(err.cause or err))
        finally:
            self._shipment = None

    # --- how it ends -----------------------------------------------------------------------------
    async def _ending_of(self, lifecycle: asyncio.Task[None]) -> Ending | None:
        """Stop the lifecycle if a cancel or the deadline came first; None means it completed."""
        self._ending = True
        if not lifecycle.done():
            lifecycle.cancel()
            try:
                await lifecycle
            except (asyncio.CancelledError, ActivityError, ChildWorkflowError, LifecycleStopped):
                pass  # stopped on purpose; the stop request says why
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
        return await self._step(
            Step.REFUND, Activities.REFUND_PAYMENT, self._order.payload.payment_id, result_type=bool
        )

    # --- commands (signals from the bridge) ------------------------------------------------------
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
            workflow.logger.info(
                "cancel requested",
                extra={"order_id": self._order.order_id, "step": self._status.step.value, "reason": reason},
            )

    @workflow.signal(name=Signals.UPDATE_ADDRESS)
    async def update_address(self, command: UpdateAddress) -> None:
        if not self._accept(command, self._change_blocked()):
            return
        address = command.payload.address
        self._status.address = address
        self._emit(EventType.ADDRESS_UPDATED, command=command, address=address.model_dump())
        if self._shipment is not None:
            try:
                await self._shipment.signal(Signals.UPDATE_ADDRESS, address)
            except ApplicationError as err:
                # the shipment ended meanwhile; the next one, if any, starts with the new address
                if err.type != "ExternalWorkflowExecutionNotFound":
                    raise

    def _approve_blocked(self) -> str | None:
        if self._approval is not None:
            return "order already approved"
        return self._change_blocked()

    def _change_blocked(self) -> str | None:
        if self._ending or self._stop_request is not None:
            return "order has ended or is ending"
        if self._dispatched:
            return "order already dispatched"
        return None

    def _accept(self, command: Command, blocked: str | None) -> bool:
        """True if the command is new and may apply; a duplicate is ignored, a blocked one rejected."""
        command_id = str(command.command_id)
        if command_id in self._commands_seen:
            workflow.logger.info(
                "duplicate command ignored",
                extra={"order_id": self._order.order_id, "command_id": command_id},
            )
            return False
        self._commands_seen.add(command_id)
        if blocked is None:
            return True
        self._emit(
            EventType.COMMAND_REJECTED, command=command, command_type=command.type.value, reason=blocked
        )
        workflow.logger.warning(
            "command rejected",
            extra={
                "order_id": self._order.order_id,
                "command_id": command_id,
                "command_type": command.type.value,
                "reason": blocked,
            },
        )
        return False

    # --- progress reports from the shipping child ------------------------------------------------
    @workflow.signal(name=Signals.PACKAGE_PREPARED)
    def on_package_prepared(self, report: StepReport) -> None:
        self._attempts.merge(report)
        self._package_ready = True
        self._status.step = Step.DISPATCH_CARRIER
        self._emit(EventType.PACKAGE_PREPARED)

    @workflow.signal(name=Signals.CARRIER_DISPATCHED)
    def on_carrier_dispatched(self, report: StepReport) -> None:
        self._attempts.merge(report)
        address = report.address or self._status.address
        # a dispatch to an address changed meanwhile is redone, so the order is not yet dispatched
        self._dispatched = address == self._status.address
        self._emit(
            EventType.CARRIER_DISPATCHED,
            tracking_number=report.tracking_number,
            address=address.model_dump(),
        )

    @workflow.signal(name=Signals.DISPATCH_FAILED)
    def on_dispatch_failed(self, report: StepReport) -> None:
        self._attempts.merge(report)
        reason = report.reason or "dispatch failed"
        self._dispatch_failures.append(reason)
        self._emit(
            EventType.DISPATCH_FAILED, reason=reason, shipping_attempt=self._status.shipping_attempts
        )
        workflow.logger.warning(
            "dispatch failed",
            extra={
                "order_id": self._order.order_id,
                "step": Step.DISPATCH_CARRIER.value,
                "attempt": self._status.shipping_attempts,
                "error": reason,
            },
        )

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> OrderStatus:
        return self._status.model_copy(
            update={"attempts": dict(self._attempts.attempts), "recent_errors": list(self._attempts.errors)}
        )

    # --- helpers ---------------------------------------------------------------------------------
    async def _step(self, step: Step, activity: str, arg: Any, result_type: type | None = None) -> Any:
        self._status.step = step
        try:
            return await run_step(
                step,
                activity,
                arg,
                policy=self._step_policy,
                on_attempt=self._attempts,
                result_type=result_type,
            )
        except ActivityError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.type == ORDER_INVALID:
                raise LifecycleStopped(Ending(OrderState.FAILED, f"invalid order: {cause.message}")) from err
            raise

    def _reach(self, state: OrderState, event: EventType, command: Command | None = None, **data: Any) -> None:
        """A state transition: status, event and log line together."""
        self._status.state = state
        self._emit(event, command=command, **data)
        workflow.logger.info(
            "state transition",
            extra={
                "order_id": self._order.order_id,
                "state": state.value,
                "step": self._status.step.value,
                "seq": self._seq,
            },
        )

    def _emit(self, event: EventType, command: Command | None = None, **data: Any) -> None:
        self._seq += 1
        now = workflow.now()
        self._status.updated_at = now
        if event.is_terminal:
            self._status.finished_at = now
        self._outbox.append(
            OrderEvent(
                event_id=workflow.uuid4(),
                type=event,
                order_id=self._order.order_id,
                seq=self._seq,
                occurred_at=now,
                correlation_id=self._order.correlation_id,
                command_id=command.command_id if command else None,
                data=data,
            )
        )

    async def _publish_events(self) -> None:
        """Publish the outbox in order, in batches, until the lifecycle has closed."""
        while True:
            await workflow.wait_condition(lambda: bool(self._outbox) or self._closing)
            if not self._outbox:
                return
            batch, self._outbox = self._outbox, []
            await workflow.execute_activity(
                Activities.PUBLISH_EVENTS,
                batch,
                start_to_close_timeout=PUBLISH_TIMEOUT,
                retry_policy=PUBLISH_RETRY,
            )

    def _time_left(self) -> timedelta:
        deadline = workflow.info().workflow_start_time + timedelta(seconds=self._policy.lifecycle_deadline_seconds)
        return max(deadline - workflow.now(), timedelta(0))
