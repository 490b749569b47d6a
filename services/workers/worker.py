"""The two Temporal workers of orderflow, ready to run in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from services.workers.activities import OrderActivities
from services.workers.interceptors import AttemptDeadlineInterceptor
from services.workers.order_workflow import OrderWorkflow
from services.workers.shipping_workflow import ShippingWorkflow
from shared import broker, db
from shared.settings import Settings

# Imported once outside the sandbox instead of again for every workflow run: these are pure
# (models and the step loop) and re-importing them per run costs the worker most of its CPU.
SANDBOX_PASSTHROUGH = ("shared", "services.workers.steps", "pydantic", "pydantic_core", "annotated_types")


STICKY_QUEUE_TIMEOUT = timedelta(seconds=2)


def sandbox_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*SANDBOX_PASSTHROUGH)
    )


def order_worker(client: Client, settings: Settings, activities: OrderActivities) -> Worker:
    return _worker(
        client,
        settings.order_task_queue,
        OrderWorkflow,
        [
            activities.receive_order,
            activities.validate_order,
            activities.charge_payment,
            activities.mark_shipped,
            activities.refund_payment,
            activities.publish_events,
        ],
    )


def shipping_worker(client: Client, settings: Settings, activities: OrderActivities) -> Worker:
    return _worker(
        client,
        settings.shipping_task_queue,
        ShippingWorkflow,
        [activities.prepare_package, activities.dispatch_carrier],
    )


def _worker(client: Client, task_queue: str, workflow_class: type, activities: list[Any]) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[workflow_class],
        activities=activities,
        workflow_runner=sandbox_runner(),
        interceptors=[AttemptDeadlineInterceptor()],
        # hung attempts hold a slot only until their timeout, but there are many at once
        max_concurrent_activities=500,
        # after a crash, a workflow's next task waits this long for the dead worker before any
        # worker takes it (the default, 10 s, would eat most of a lifecycle's 15 s)
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
    )


@asynccontextmanager
async def running_workers(client: Client, settings: Settings) -> AsyncIterator[None]:
    """Both workers polling, with their database pool and broker channel, until the block ends."""
    # the JSON log line carries the workflow's context as fields, not appended to the message
    workflow.logger.workflow_info_on_message = False
    async with AsyncExitStack() as stack:
        engine = db.create_engine(settings)
        stack.push_async_callback(engine.dispose)
        connection = await broker.connect(settings, "workers")
        stack.push_async_callback(connection.close)
        channel, topology = await broker.open_channel(connection)
        await broker.declare_audit_queue(channel, topology, settings)
        activities = OrderActivities(db.session_factory(engine), topology)
        for worker in (order_worker(client, settings, activities), shipping_worker(client, settings, activities)):
            await stack.enter_async_context(worker)
        yield
