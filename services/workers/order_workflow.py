"""OrderWorkflow (task queue `order-tq`): one order's lifecycle, admitted → receive → validate →
review → charge payment → ShippingWorkflow → mark shipped. A cancel or the deadline stops it where it
is: the shipment is cancelled, a charge refunded, then the admission slot given back."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from services.workers.activity_interface import ORDER_INVALID, ChargeOutcome, OrderActivities
    from services.workers.admission_slot import AdmissionSlot, get_through
    from services.workers.order_state import (
        BEFORE_PAYMENT,
        Deadline,
        OrderRecord,
        Phase,
        Shipping,
        ShippingPhase,
        Stop,
    )
    from services.workers.shipment import DispatchFailed
    from services.workers.shipping_workflow import ShippingWorkflow
    from services.workers.steps import (
        DEADLINE_EXCEEDED,
        InputT,
        ResultT,
        StepActivity,
        StepAttempts,
        deadline_reason,
        run_step,
    )
    from shared.contracts import (
        AddressUpdatedData,
        ApprovedData,
        ApproveOrder,
        AwaitingApprovalData,
        CancelledData,
        CancelOrder,
        CompletedData,
        FailedData,
        OrderEvent,
        OrderState,
        OrderStatus,
        PaymentChargedData,
        ReceivedData,
        ShippedData,
        Step,
        UpdateAddress,
        ValidatedData,
    )
    from shared.lifecycle import EVENTS_QUERY, ORDER_WORKFLOW, STATUS_QUERY, OrderWorkflowInput, Signals

CANCELLED_THROUGH_TEMPORAL = "cancelled through Temporal (workflow cancellation request)"


@workflow.defn(name=ORDER_WORKFLOW)
class OrderWorkflow:
    @workflow.init
    def __init__(self, start: OrderWorkflowInput) -> None:
        self._order = start.order
        self._policy = start.policy
        started = workflow.info().workflow_start_time
        self._deadline = Deadline(started + timedelta(seconds=start.policy.lifecycle_deadline_seconds))
        self._record = OrderRecord(start)
        self._status, self._outbox = self._record.status, self._record.outbox
        self._advance, self._emit = self._record.advance, self._record.emit
        self._phase = Phase.RUNNING
        self._stop: Stop | None = None  # why, once asked to stop
        self._shipping = Shipping(self._record, self._policy)
        self._slot = AdmissionSlot(self._status, self._outbox.gathering)
        self._approval: ApproveOrder | None = None
        self._admit(start)

    # --- the lifecycle ---------------------------------------------------------------------------
    @workflow.run
    async def run(self, start: OrderWorkflowInput) -> OrderStatus:
        publisher = asyncio.create_task(self._outbox.publish())
        lifecycle = asyncio.create_task(self._lifecycle())
        cancelled_through_temporal = False
        try:
            if await self._deadline.passes_before(
                lambda: lifecycle.done() or self._phase is not Phase.RUNNING
            ):
                reason = deadline_reason(self._status.step.value, self._policy.lifecycle_deadline_seconds)
                self._request_stop(Stop(OrderState.FAILED, reason))
        except asyncio.CancelledError:  # an operator cancelled the workflow: end it like a CancelOrder
            cancelled_through_temporal = True
            if self._phase is Phase.RUNNING:
                self._request_stop(Stop(OrderState.CANCELLED, CANCELLED_THROUGH_TEMPORAL))
        conclusion = asyncio.create_task(self._conclude(lifecycle, publisher))
        while not conclusion.done():
            try:
                await asyncio.shield(conclusion)
            except asyncio.CancelledError:  # already ending: refund, slot and last events still happen
                cancelled_through_temporal = True
        if cancelled_through_temporal and self._status.state is OrderState.CANCELLED:
            raise asyncio.CancelledError  # Temporal shows the workflow as Canceled, as asked
        return self.status()

    async def _lifecycle(self) -> None:
        order_id = self._order.order_id
        await self._step(Step.RECEIVE, OrderActivities.receive_order_step, self._order)
        self._advance(OrderState.RECEIVED, ReceivedData(placed_by=self._status.placed_by))

        await self._step(Step.VALIDATE, OrderActivities.validate_order_step, order_id)
        self._advance(OrderState.VALIDATED, ValidatedData())

        await self._review()

        payment = self._record.payment
        charge = await self._step(Step.CHARGE_PAYMENT, OrderActivities.charge_payment_step, payment)
        already_charged = charge is ChargeOutcome.ALREADY_CHARGED
        charged = PaymentChargedData(amount_cents=payment.amount_cents, already_charged=already_charged)
        self._advance(OrderState.PAID, charged)

        self._status.tracking_number = tracking_number = await self._ship()

        await self._step(Step.MARK_SHIPPED, OrderActivities.mark_shipped_step, order_id)
        self._advance(OrderState.SHIPPED, ShippedData(tracking_number=tracking_number))

    def _admit(self, start: OrderWorkflowInput) -> None:
        """The first event, then the commands that reached the order while it waited for a slot."""
        self._record.admitted(start)
        for command in start.early_commands:
            if isinstance(command, ApproveOrder):
                self.approve(command)
            else:
                self._change_address(command)

    async def _review(self) -> None:
        self._status.step = Step.REVIEW
        window = self._policy.review_window_seconds
        self._advance(OrderState.AWAITING_APPROVAL, AwaitingApprovalData(review_window_seconds=window))
        self._deadline.pause()
        gave_slot_back = self._approval is None and await self._slot.leave_for_review(
            lambda: self._approval is not None,
            min(self._policy.review_slot_grace_seconds, window),
            lambda: self._deadline.paused_seconds() >= window,
        )
        # not in a `finally`: an evicted workflow closes this coroutine where the clock cannot be read
        try:
            await workflow.wait_condition(
                lambda: self._approval is not None, timeout=window - self._deadline.paused_seconds()
            )
        except TimeoutError:
            self._deadline.resume()
            raise Stop(OrderState.CANCELLED, "review_timeout") from None
        if gave_slot_back:
            await self._slot.regain()  # its wait counts as the review's
        self._deadline.resume()
        if self._status.state is OrderState.AWAITING_APPROVAL:
            self._record_approval()

    def _record_approval(self) -> None:
        approval = self._approval
        assert approval is not None
        self._status.approved_by = approval.issued_by.subject if approval.issued_by else None
        approved = ApprovedData(approved_by=self._status.approved_by, note=approval.payload.note)
        self._advance(OrderState.APPROVED, approved, command=approval)

    async def _ship(self) -> str:
        """Ship until a shipment dispatches to the order's current address, up to the policy's bound."""
        failures = 0
        while failures < self._policy.max_shipping_attempts:
            dispatched = await self._shipping.run(self._deadline.at, lambda: self._phase is Phase.CONCLUDING)
            if self._phase is Phase.CONCLUDING:
                # it ended before it saw our cancel (which the SDK then drops): record what the carrier got
                if dispatched is not None:
                    self._shipping.dispatched(dispatched)
                raise asyncio.CancelledError()
            if dispatched is None:
                failures += 1
            elif self._shipping.dispatched(dispatched):
                return dispatched.tracking_number
            # else the address changed as the carrier took the old one: dispatch again
        last = f"; last: {self._shipping.failures[-1]}" if self._shipping.failures else ""
        raise Stop(OrderState.FAILED, f"dispatch failed {failures} times{last}")

    # --- how it concludes ------------------------------------------------------------------------
    async def _conclude(self, lifecycle: asyncio.Task[None], publisher: asyncio.Task[None]) -> None:
        await self._finish(await self._stop_lifecycle(lifecycle))
        await self._slot.release()
        self._outbox.close()
        await publisher
        # a command that lands while the order ends is answered (rejected) before completing
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._outbox.publish()

    async def _stop_lifecycle(self, lifecycle: asyncio.Task[None]) -> Stop | None:
        """Stop the lifecycle if a cancel or the deadline came first; None if it completed."""
        self._phase = Phase.CONCLUDING
        if not lifecycle.done():
            lifecycle.cancel()
            with suppress(asyncio.CancelledError, ApplicationError, ChildWorkflowError, Stop):
                await lifecycle  # stopped on purpose: `self._stop` says why
            return self._stop
        try:
            lifecycle.result()
        except Stop as stop:
            return stop
        return None

    async def _finish(self, stop: Stop | None) -> None:
        if stop is None:
            self._status.step = Step.DONE
            self._advance(OrderState.COMPLETED, CompletedData())
            return
        refunded = False
        if self._status.step not in BEFORE_PAYMENT:  # an attempt cut short may still have charged
            self._status.step = Step.REFUND
            with self._outbox.gathering():
                refunded = await get_through(OrderActivities.refund_payment, self._record.payment)
        self._status.step = Step.DONE
        self._status.refunded = refunded
        self._status.reason = stop.reason
        ending = CancelledData if stop.state is OrderState.CANCELLED else FailedData
        self._advance(stop.state, ending(reason=stop.reason, refunded=refunded), command=stop.command)

    def _request_stop(self, stop: Stop) -> None:
        self._phase, self._stop = Phase.STOPPING, stop
        if stop.state is OrderState.CANCELLED:
            extra = {"order_id": self._order.order_id, "step": self._status.step.value, "reason": stop.reason}
            workflow.logger.info("cancel requested", extra=extra)

    # --- commands (signals from the bridge, or early commands at the start) ----------------------
    @workflow.signal(name=Signals.APPROVE)
    def approve(self, command: ApproveOrder) -> None:
        blocked = "order already approved" if self._approval is not None else self._change_blocked()
        if self._record.accept(command, blocked):
            self._approval = command
            # in review its event comes now, before anything later in this task; an early one waits
            if self._status.state is OrderState.AWAITING_APPROVAL:
                self._record_approval()

    @workflow.signal(name=Signals.CANCEL)
    def cancel(self, command: CancelOrder) -> None:
        if self._record.accept(command, self._change_blocked()):
            self._request_stop(
                Stop(OrderState.CANCELLED, command.payload.reason or "cancelled on request", command)
            )

    @workflow.signal(name=Signals.UPDATE_ADDRESS)
    async def update_address(self, command: UpdateAddress) -> None:
        if not self._change_address(command) or self._shipping.current is None:
            return
        try:
            await self._shipping.current.signal(ShippingWorkflow.update_address, command.payload.address)
        except ApplicationError as err:
            # the shipment ended meanwhile; the next one, if any, starts with the new address
            if err.type != "ExternalWorkflowExecutionNotFound":
                raise

    def _change_address(self, command: UpdateAddress) -> bool:
        if not self._record.accept(command, self._change_blocked()):
            return False
        self._status.address = command.payload.address
        self._emit(AddressUpdatedData(address=command.payload.address), command=command)
        return True

    def _change_blocked(self) -> str | None:
        if self._phase is not Phase.RUNNING:
            return "order has ended or is ending"
        if self._shipping.phase is ShippingPhase.DISPATCHED:
            return "order already dispatched"
        return None

    @workflow.signal(name=Signals.SLOT_FREED)
    def on_slot_freed(self) -> None:
        self._slot.wake()

    # --- progress reports from the shipping child ------------------------------------------------
    @workflow.signal(name=Signals.PACKAGE_PREPARED)
    def on_package_prepared(self, prepare: StepAttempts) -> None:
        self._shipping.package_ready(prepare)

    @workflow.signal(name=Signals.DISPATCH_FAILED)
    def on_dispatch_failed(self, failed: DispatchFailed) -> None:
        self._shipping.dispatch_failed(failed)

    @workflow.query(name=EVENTS_QUERY)
    def events(self) -> list[OrderEvent]:
        """Every event emitted, published or not: the reconciler publishes a terminated one's."""
        return list(self._outbox.emitted)

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> OrderStatus:
        return self._record.snapshot()

    # --- helpers ---------------------------------------------------------------------------------
    async def _step(self, step: Step, activity: StepActivity[InputT, ResultT], arg: InputT) -> ResultT:
        self._status.step = step
        try:
            with self._outbox.gathering():
                return await run_step(
                    step,
                    activity,
                    arg,
                    policy=self._policy,
                    deadline=self._deadline.at,
                    attempts=self._record.attempts,
                )
        except ApplicationError as err:
            if err.type == DEADLINE_EXCEEDED:
                raise Stop(OrderState.FAILED, err.message) from err
            if err.type == ORDER_INVALID:
                raise Stop(OrderState.FAILED, f"invalid order: {err.message}") from err
            raise
