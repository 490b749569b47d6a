"""The order lifecycle's shape on bare Temporal, for the benchmark's baseline: no broker, no database.

    receive → validate → approval signal → charge → BareShippingWorkflow (prepare → dispatch) → mark shipped
                           (review window)                                     (bounded re-shipping)
    alongside: the lifecycle deadline; a stopped order is refunded if it was charged

The six business steps are the project's own activity signatures (`OrderActivities`) implemented by
the contract's fault injector alone (`services.workers.faults.flaky_call`, unchanged), run as local
activities through the project's own `run_step` (one local activity per step, 3 attempts in flight
× 0.3 s inside it by default, from the same `LifecyclePolicy` as the pipeline's settings), by
workers configured as the project's. Nothing
else: no events published, no status kept, no progress signals from the child, no admission. Two
points of the lifecycle are reported to the bench on the worker's stdout by a local activity
(`notify`): when the order waits for approval (the bench then signals `approve`) and how it ended.

Run by the bench as a worker process:  python -m bench.bare_lifecycle --address 127.0.0.1:7233
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from datetime import datetime, timedelta

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from services.workers import activity_interface, faults
    from services.workers.activity_interface import ChargeOutcome, OrderActivities, PaymentInput
    from services.workers.steps import STEP_EXHAUSTED, AttemptLog, InputT, ResultT, StepActivity, run_step
    from shared.contracts import Address, OrderEvent, PlaceOrder, Step
    from shared.lifecycle import WORKFLOW_TASK_TIMEOUT, LifecyclePolicy, OrderWorkflowInput

ORDER_TASK_QUEUE = "bare-order-tq"
SHIPPING_TASK_QUEUE = "bare-shipping-tq"
ORDER_WORKFLOW = "BareOrderWorkflow"
SHIPPING_WORKFLOW = "BareShippingWorkflow"
APPROVE_SIGNAL = "approve"
NOTICE_MARK = "BARE-LIFECYCLE"
"""A line `BARE-LIFECYCLE <order id> <event>` on the worker's stdout is a notice for the bench."""

AWAITING_APPROVAL, COMPLETED, CANCELLED, FAILED = "awaiting_approval", "completed", "cancelled", "failed"
NOTICES = (AWAITING_APPROVAL, COMPLETED, CANCELLED, FAILED)
NOTIFY_TIMEOUT = timedelta(seconds=5)
# retried, but never backing off past Core's local retry threshold (see services/workers/steps.py)
NOTIFY_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=1))


def workflow_id(order_id: str) -> str:
    return f"bare-{order_id}"


class BareShipment(BaseModel):
    order_id: str
    address: Address
    policy: LifecyclePolicy
    deadline: datetime
    package_ready: bool


class Shipped(BaseModel):
    package_ready: bool
    tracking_number: str | None = None


# --- activities: the fault injector and nothing else ---------------------------------------------
class BareActivities(OrderActivities):
    """The business steps without their database work; what they return is made up."""

    async def receive_order(self, order: PlaceOrder) -> None:
        await faults.flaky_call()

    async def validate_order(self, order_id: str) -> None:
        await faults.flaky_call()

    async def charge_payment(self, payment: PaymentInput) -> ChargeOutcome:
        await faults.flaky_call()
        return ChargeOutcome.CHARGED

    async def prepare_package(self, order_id: str) -> None:
        await faults.flaky_call()

    async def dispatch_carrier(self, dispatch: activity_interface.DispatchCarrierInput) -> str:
        await faults.flaky_call()
        return f"TRK-{dispatch.order_id}"

    async def mark_shipped(self, order_id: str) -> None:
        await faults.flaky_call()

    @activity.defn
    async def refund_payment(self, payment: PaymentInput) -> bool:
        return True  # the pipeline's refund calls no fault injector either

    @activity.defn
    async def publish_events(self, events: list[OrderEvent]) -> None:
        raise NotImplementedError("the baseline publishes no events")

    @activity.defn
    async def leave_admission_for_review(self, order_id: str) -> None:
        raise NotImplementedError("the baseline admits every order at once")

    @activity.defn
    async def resume_admission(self, order_id: str) -> bool:
        raise NotImplementedError("the baseline admits every order at once")

    @activity.defn
    async def release_admission(self, order_id: str) -> None:
        raise NotImplementedError("the baseline admits every order at once")


@activity.defn
async def notify(notice: str) -> None:
    # one write, so that the line arrives whole between whatever else goes to stdout
    os.write(sys.stdout.fileno(), f"{NOTICE_MARK} {notice}\n".encode())


# --- workflows -----------------------------------------------------------------------------------
async def business_step(
    step: Step,
    activity: StepActivity[InputT, ResultT],
    arg: InputT,
    policy: LifecyclePolicy,
    deadline: datetime,
    max_attempts: int | None = None,
) -> ResultT:
    """One business step through the project's step loop (the attempts' log is not kept)."""
    attempts = AttemptLog(step.value)
    return await run_step(
        step, activity, arg, policy=policy, deadline=deadline, attempts=attempts, max_attempts=max_attempts
    )


async def tell_bench(order_id: str, event: str) -> None:
    await workflow.execute_local_activity(
        notify, f"{order_id} {event}", start_to_close_timeout=NOTIFY_TIMEOUT, retry_policy=NOTIFY_RETRY
    )


class Stopped(Exception):
    def __init__(self, ending: str) -> None:
        super().__init__(ending)
        self.ending = ending


@workflow.defn(name=ORDER_WORKFLOW)
class BareOrderWorkflow:
    def __init__(self) -> None:
        self._approved = False
        self._charged = False

    @workflow.run
    async def run(self, start: OrderWorkflowInput) -> str:
        order_id, policy = start.order.order_id, start.policy
        deadline = workflow.info().workflow_start_time + timedelta(seconds=policy.lifecycle_deadline_seconds)
        lifecycle = asyncio.create_task(self._lifecycle(start, deadline))
        try:
            await workflow.wait_condition(lifecycle.done, timeout=deadline - workflow.now())
            ending = self._ending_of(lifecycle)
        except TimeoutError:
            lifecycle.cancel()
            ending = FAILED
        if ending != COMPLETED and self._charged:
            payment = PaymentInput(
                order_id=order_id,
                payment_id=start.order.payload.payment_id,
                amount_cents=start.order.payload.amount_cents,
            )
            # as the pipeline's: one local activity, retried until it gets through
            await workflow.execute_local_activity_method(
                OrderActivities.refund_payment,
                payment,
                start_to_close_timeout=NOTIFY_TIMEOUT,
                retry_policy=NOTIFY_RETRY,
            )
        await tell_bench(order_id, ending)
        return ending

    @staticmethod
    def _ending_of(lifecycle: asyncio.Task[None]) -> str:
        try:
            lifecycle.result()
        except Stopped as stopped:
            return stopped.ending
        except Exception:  # noqa: BLE001 - a step given up at the deadline
            return FAILED
        return COMPLETED

    async def _lifecycle(self, start: OrderWorkflowInput, deadline: datetime) -> None:
        order, policy = start.order, start.policy
        await business_step(Step.RECEIVE, OrderActivities.receive_order_step, order, policy, deadline)
        await business_step(
            Step.VALIDATE, OrderActivities.validate_order_step, order.order_id, policy, deadline
        )
        await tell_bench(order.order_id, AWAITING_APPROVAL)
        try:
            await workflow.wait_condition(lambda: self._approved, timeout=start.policy.review_window_seconds)
        except TimeoutError:
            raise Stopped(CANCELLED) from None
        self._charged = True  # from here on a stop refunds
        charge = PaymentInput(
            order_id=order.order_id,
            payment_id=order.payload.payment_id,
            amount_cents=order.payload.amount_cents,
        )
        await business_step(
            Step.CHARGE_PAYMENT, OrderActivities.charge_payment_step, charge, policy, deadline
        )
        shipment = BareShipment(
            order_id=order.order_id,
            address=order.payload.address,
            policy=start.policy,
            deadline=deadline,
            package_ready=False,
        )
        await self._ship(shipment)
        await business_step(
            Step.MARK_SHIPPED, OrderActivities.mark_shipped_step, order.order_id, policy, deadline
        )

    async def _ship(self, shipment: BareShipment) -> None:
        for attempt in range(1, shipment.policy.max_shipping_attempts + 1):
            try:
                shipped = await workflow.execute_child_workflow(
                    BareShippingWorkflow.run,
                    shipment,
                    id=f"{workflow.info().workflow_id}-shipping-{attempt}",
                    task_queue=SHIPPING_TASK_QUEUE,
                    task_timeout=WORKFLOW_TASK_TIMEOUT,
                )
            except ChildWorkflowError:
                continue
            if shipped.tracking_number:
                return
            shipment = shipment.model_copy(update={"package_ready": shipped.package_ready})
        raise Stopped(FAILED)

    @workflow.signal(name=APPROVE_SIGNAL)
    def approve(self) -> None:
        self._approved = True


@workflow.defn(name=SHIPPING_WORKFLOW)
class BareShippingWorkflow:
    @workflow.run
    async def run(self, shipment: BareShipment) -> Shipped:
        order_id, policy, deadline = shipment.order_id, shipment.policy, shipment.deadline
        if not shipment.package_ready:
            await business_step(
                Step.PREPARE_PACKAGE, OrderActivities.prepare_package_step, order_id, policy, deadline
            )
        carrier = activity_interface.DispatchCarrierInput(order_id=order_id, address=shipment.address)
        try:
            tracking_number = await business_step(
                Step.DISPATCH_CARRIER,
                OrderActivities.dispatch_carrier_step,
                carrier,
                policy,
                deadline,
                max_attempts=policy.dispatch_attempts_per_shipment,
            )
        except ApplicationError as err:
            if err.type != STEP_EXHAUSTED:
                raise
            return Shipped(package_ready=True)
        return Shipped(package_ready=True, tracking_number=tracking_number)


# --- the worker process ----------------------------------------------------------------------------
def quiet() -> None:
    """Errors only: an attempt failing or timing out is the expected case, not news."""
    from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

    logging.basicConfig(level=logging.ERROR)
    errors_only = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=errors_only))))


async def run_worker(address: str) -> None:
    """The order and the shipping worker, configured as the project's (runner, slots, stickiness)."""
    # the workflows by their module's real name: as `python -m`, this file is `__main__`, which
    # the workflow sandbox cannot import again
    from bench.bare_lifecycle import BareActivities, BareOrderWorkflow, BareShippingWorkflow, notify
    from services.workers.worker import (
        order_activities,
        shipping_activities,
        workflow_runner,
        workflow_worker,
    )
    from shared.settings import Settings
    from shared.temporal import connect_temporal

    quiet()
    settings = Settings(temporal_address=address)
    client = await connect_temporal(settings)
    activities = BareActivities()
    # every activity of the baseline is local; the workflows run as the pipeline's do (sandbox or not)
    runner = workflow_runner(settings)
    order_queue = [*order_activities(activities), notify]
    workers = [
        workflow_worker(
            client,
            ORDER_TASK_QUEUE,
            BareOrderWorkflow,
            order_queue,
            workflow_runner=runner,
            no_remote_activities=True,
        ),
        workflow_worker(
            client,
            SHIPPING_TASK_QUEUE,
            BareShippingWorkflow,
            shipping_activities(activities),
            workflow_runner=runner,
            no_remote_activities=True,
        ),
    ]
    print("bare workers polling", ORDER_TASK_QUEUE, SHIPPING_TASK_QUEUE, flush=True)
    await asyncio.gather(*(worker.run() for worker in workers))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", required=True, help="the Temporal server, host:port")
    args = parser.parse_args()
    try:
        asyncio.run(run_worker(args.address))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
