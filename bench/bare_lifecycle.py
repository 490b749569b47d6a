"""The order lifecycle's shape on bare Temporal, for the benchmark's baseline: no broker, no database.

    receive → validate → approval signal → charge → BareShippingWorkflow (prepare → dispatch) → mark shipped
                           (review window)                                     (bounded re-shipping)
    alongside: the lifecycle deadline; a stopped order is refunded if it was charged

The six business steps only call the contract's fault injector (`services.workers.faults.flaky_call`,
unchanged) and run through the project's own `run_step` (3 attempts in flight × 0.3 s by default,
from the same `LifecyclePolicy` as the pipeline's settings). Nothing else: no events published, no
status kept, no progress signals from the child. Two points of the lifecycle are reported to the
bench on the worker's stdout by a local activity (`notify`): when the order waits for approval (the
bench then signals `approve`) and how it ended.

Run by the bench as a worker process:  python -m bench.bare_lifecycle --address 127.0.0.1:7233
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from services.workers import faults
    from services.workers.steps import Activities, StepExhausted, StepPolicy, run_step
    from shared.contracts import Step
    from shared.lifecycle import LifecyclePolicy

TASK_QUEUE = "bare-order-tq"
ORDER_WORKFLOW = "BareOrderWorkflow"
SHIPPING_WORKFLOW = "BareShippingWorkflow"
APPROVE_SIGNAL = "approve"
NOTIFY = "notify"
NOTICE_MARK = "BARE-LIFECYCLE"
"""A line `BARE-LIFECYCLE <order id> <event>` on the worker's stdout is a notice for the bench."""

AWAITING_APPROVAL, COMPLETED, CANCELLED, FAILED = "awaiting_approval", "completed", "cancelled", "failed"
NOTICES = (AWAITING_APPROVAL, COMPLETED, CANCELLED, FAILED)
NOTIFY_TIMEOUT = timedelta(seconds=5)


def workflow_id(order_id: str) -> str:
    return f"bare-{order_id}"


@dataclass
class BareOrder:
    order_id: str
    policy: LifecyclePolicy


@dataclass
class BareShipment:
    order_id: str
    policy: LifecyclePolicy
    package_ready: bool


@dataclass
class Shipped:
    package_ready: bool
    tracking_number: str | None = None


# --- activities: the fault injector and nothing else ---------------------------------------------
@activity.defn(name=Activities.RECEIVE_ORDER)
async def receive_order(order_id: str) -> None:
    await faults.flaky_call()


@activity.defn(name=Activities.VALIDATE_ORDER)
async def validate_order(order_id: str) -> None:
    await faults.flaky_call()


@activity.defn(name=Activities.CHARGE_PAYMENT)
async def charge_payment(order_id: str) -> None:
    await faults.flaky_call()


@activity.defn(name=Activities.PREPARE_PACKAGE)
async def prepare_package(order_id: str) -> None:
    await faults.flaky_call()


@activity.defn(name=Activities.DISPATCH_CARRIER)
async def dispatch_carrier(order_id: str) -> str:
    await faults.flaky_call()
    return f"TRK-{order_id}"


@activity.defn(name=Activities.MARK_SHIPPED)
async def mark_shipped(order_id: str) -> None:
    await faults.flaky_call()


@activity.defn(name=Activities.REFUND_PAYMENT)
async def refund_payment(order_id: str) -> None:
    pass  # the pipeline's refund calls no fault injector either


@activity.defn(name=NOTIFY)
async def notify(notice: str) -> None:
    # one write, so that the line arrives whole between whatever else goes to stdout
    os.write(sys.stdout.fileno(), f"{NOTICE_MARK} {notice}\n".encode())


ACTIVITIES = [
    receive_order, validate_order, charge_payment, prepare_package, dispatch_carrier, mark_shipped,
    refund_payment, notify,
]


# --- workflows -----------------------------------------------------------------------------------
def _no_bookkeeping(step: Step, attempt: int, error: str | None) -> None:
    """The baseline keeps no attempt log: nothing to show, nothing to log."""


async def business_step(step: Step, activity_name: str, order_id: str, policy: StepPolicy) -> object:
    return await run_step(step, activity_name, order_id, policy=policy, on_attempt=_no_bookkeeping)


async def tell_bench(order_id: str, event: str) -> None:
    await workflow.execute_local_activity(
        NOTIFY, f"{order_id} {event}", start_to_close_timeout=NOTIFY_TIMEOUT, retry_policy=RetryPolicy()
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
    async def run(self, order: BareOrder) -> str:
        lifecycle = asyncio.create_task(self._lifecycle(order))
        deadline = timedelta(seconds=order.policy.lifecycle_deadline_seconds)
        try:
            await workflow.wait_condition(lifecycle.done, timeout=deadline)
            ending = self._ending_of(lifecycle)
        except TimeoutError:
            lifecycle.cancel()
            ending = FAILED
        if ending != COMPLETED and self._charged:
            await business_step(Step.REFUND, Activities.REFUND_PAYMENT, order.order_id, StepPolicy.of(order.policy))
        await tell_bench(order.order_id, ending)
        return ending

    @staticmethod
    def _ending_of(lifecycle: asyncio.Task[None]) -> str:
        try:
            lifecycle.result()
        except Stopped as stopped:
            return stopped.ending
        return COMPLETED

    async def _lifecycle(self, order: BareOrder) -> None:
        policy = StepPolicy.of(order.policy)
        await business_step(Step.RECEIVE, Activities.RECEIVE_ORDER, order.order_id, policy)
        await business_step(Step.VALIDATE, Activities.VALIDATE_ORDER, order.order_id, policy)
        await tell_bench(order.order_id, AWAITING_APPROVAL)
        window = timedelta(seconds=order.policy.review_window_seconds)
        try:
            await workflow.wait_condition(lambda: self._approved, timeout=window)
        except TimeoutError:
            raise Stopped(CANCELLED) from None
        self._charged = True  # from here on a stop refunds
        await business_step(Step.CHARGE_PAYMENT, Activities.CHARGE_PAYMENT, order.order_id, policy)
        await self._ship(order)
        await business_step(Step.MARK_SHIPPED, Activities.MARK_SHIPPED, order.order_id, policy)

    async def _ship(self, order: BareOrder) -> None:
        package_ready = False
        for attempt in range(1, order.policy.max_shipping_attempts + 1):
            try:
                shipped = await workflow.execute_child_workflow(
                    SHIPPING_WORKFLOW,
                    BareShipment(order.order_id, order.policy, package_ready),
                    id=f"{workflow.info().workflow_id}-shipping-{attempt}",
                    result_type=Shipped,
                )
            except ChildWorkflowError:
                continue
            if shipped.tracking_number:
                return
            package_ready = shipped.package_ready
        raise Stopped(FAILED)

    @workflow.signal(name=APPROVE_SIGNAL)
    def approve(self) -> None:
        self._approved = True


@workflow.defn(name=SHIPPING_WORKFLOW)
class BareShippingWorkflow:
    @workflow.run
    async def run(self, shipment: BareShipment) -> Shipped:
        if not shipment.package_ready:
            await business_step(
                Step.PREPARE_PACKAGE, Activities.PREPARE_PACKAGE, shipment.order_id, StepPolicy.of(shipment.policy)
            )
        dispatch = StepPolicy.of(shipment.policy, max_attempts=shipment.policy.dispatch_attempts_per_shipment)
        try:
            tracking_number = await business_step(
                Step.DISPATCH_CARRIER, Activities.DISPATCH_CARRIER, shipment.order_id, dispatch
            )
        except StepExhausted:
            return Shipped(package_ready=True)
        return Shipped(package_ready=True, tracking_number=str(tracking_number))


WORKFLOWS = [BareOrderWorkflow, BareShippingWorkflow]


# --- the worker process ----------------------------------------------------------------------------
def quiet() -> None:
    """Errors only: an attempt failing or timing out is the expected case, not news."""
    from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

    logging.basicConfig(level=logging.ERROR)
    errors_only = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=errors_only))))


async def run_worker(address: str) -> None:
    from temporalio.worker import Worker

    # the workflows by their module's real name: as `python -m`, this file is `__main__`, which
    # the workflow sandbox cannot import again
    from bench.bare_lifecycle import ACTIVITIES, WORKFLOWS
    from services.workers.interceptors import AttemptDeadlineInterceptor
    from services.workers.worker import STICKY_QUEUE_TIMEOUT, sandbox_runner
    from shared.settings import Settings
    from shared.temporal import connect_temporal

    quiet()
    client = await connect_temporal(Settings(temporal_address=address))
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=WORKFLOWS,
        activities=ACTIVITIES,
        workflow_runner=sandbox_runner(),
        interceptors=[AttemptDeadlineInterceptor()],
        max_concurrent_activities=500,
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
    )
    print("bare worker polling", TASK_QUEUE, flush=True)
    await worker.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the Temporal server, host:port")
    args = parser.parse_args()
    try:
        asyncio.run(run_worker(args.address))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
