"""The two Temporal workers of orderflow, ready to run in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import TypedDict, Unpack

from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import (
    SandboxedWorkflowRunner,
    SandboxRestrictions,
)

from services.workers.activities import BusinessActivities
from services.workers.boundary import OrderActivities
from services.workers.order_workflow import OrderWorkflow
from services.workers.reconciler import Reconciler
from services.workers.shipping_workflow import ShippingWorkflow
from shared import broker, db
from shared.admissions import AdmissionSlots
from shared.settings import Settings
from shared.temporal import tracing_interceptors

# Imported once outside the sandbox instead of again for every workflow run: these are pure
# (models, the workflow's state and the step loop) and re-importing them per run costs the worker CPU.
SANDBOX_PASSTHROUGH = (
    "shared",
    "services.workers.admission_slot",
    "services.workers.boundary",
    "services.workers.command_gate",
    "services.workers.order_state",
    "services.workers.outbox",
    "services.workers.steps",
    "services.workers.attempts",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    # the tracing interceptor's workflow side: one OpenTelemetry (its context, its tracer) for all
    "opentelemetry",
)

STICKY_QUEUE_TIMEOUT = timedelta(seconds=2)

# A step is a local activity that holds its workflow task open: every lifecycle in a step holds a
# workflow task slot and a local activity slot, and the defaults (100) would cap a worker there.
MAX_WORKFLOW_TASKS = 500
MAX_LOCAL_ACTIVITIES = 1000
MAX_ACTIVITIES = 100  # only publish_events runs as a regular activity: one batch of an order at a time


def sandbox_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*SANDBOX_PASSTHROUGH)
    )


def workflow_runner(settings: Settings) -> WorkflowRunner:
    """Production runs workflows without Temporal's sandbox unless `ORDERFLOW_WORKFLOW_SANDBOX`:
    the sandbox re-imports each workflow module per run and wraps every activation, about a
    quarter of the workers' CPU per order (docs/performance.md). Its guard stays where it finds
    mistakes: the workflow tests run every workflow in it (a call to the clock, randomness or I/O
    fails there), and the replay tests catch a change that breaks determinism."""
    return sandbox_runner() if settings.workflow_sandbox else UnsandboxedWorkflowRunner()


Activity = Callable[..., object]


def order_activities(activities: OrderActivities) -> list[Activity]:
    """What the order task queue's worker runs: OrderWorkflow's activities, local or not."""
    return [
        activities.receive_order_step,
        activities.validate_order_step,
        activities.charge_payment_step,
        activities.mark_shipped_step,
        activities.refund_payment,
        activities.publish_events,
        activities.leave_admission_for_review,
        activities.resume_admission,
        activities.release_admission,
    ]


def shipping_activities(activities: OrderActivities) -> list[Activity]:
    return [
        activities.prepare_package_step,
        activities.dispatch_carrier_step,
    ]


class WorkerOptions(TypedDict, total=False):
    workflow_runner: WorkflowRunner | None
    max_cached_workflows: int


def order_worker(
    client: Client, task_queue: str, activities: OrderActivities, **options: Unpack[WorkerOptions]
) -> Worker:
    return workflow_worker(client, task_queue, OrderWorkflow, order_activities(activities), **options)


def shipping_worker(
    client: Client, task_queue: str, activities: OrderActivities, **options: Unpack[WorkerOptions]
) -> Worker:
    # its activities are all local: no polls for remote activity tasks
    local_only = shipping_activities(activities)
    return workflow_worker(
        client, task_queue, ShippingWorkflow, local_only, no_remote_activities=True, **options
    )


def workflow_worker(
    client: Client,
    task_queue: str,
    workflow_class: type,
    activities: Sequence[Activity],
    *,
    workflow_runner: WorkflowRunner | None = None,
    max_cached_workflows: int = 1000,
    no_remote_activities: bool = False,
) -> Worker:
    """A worker as in production: the launcher and the bench choose the runner (None: the
    sandbox), tests a smaller cache (1000 is the SDK's default)."""
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[workflow_class],
        activities=activities,
        workflow_runner=workflow_runner or sandbox_runner(),
        max_cached_workflows=max_cached_workflows,
        no_remote_activities=no_remote_activities,
        max_concurrent_workflow_tasks=MAX_WORKFLOW_TASKS,
        max_concurrent_local_activities=MAX_LOCAL_ACTIVITIES,
        max_concurrent_activities=MAX_ACTIVITIES,
        # after a crash, a workflow's next task waits this long for the dead worker before any
        # worker takes it (the default, 10 s, would eat most of a lifecycle's 15 s)
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
        interceptors=tracing_interceptors(),
    )


@asynccontextmanager
async def running_workers(client: Client, settings: Settings) -> AsyncIterator[None]:
    """Both workers polling, and the reconciler of terminated lifecycles beside them, with their
    database pool and broker channel, until the block ends."""
    # the JSON log line carries the workflow's context as fields, not appended to the message
    workflow.logger.workflow_info_on_message = False
    async with AsyncExitStack() as stack:
        engine = db.create_engine(settings)
        stack.push_async_callback(engine.dispose)
        connection = await broker.connect(settings, "workers")
        stack.push_async_callback(connection.close)
        channel, topology = await broker.open_channel(connection)
        await broker.declare_audit_queue(channel, topology, settings)
        sessions = db.session_factory(engine)
        # each write of a business function is one statement, and READ COMMITTED gives each
        # statement its own snapshot anyway: in autocommit they need no BEGIN and COMMIT round
        # trips, a third of a step's trips to the database (the slots need real transactions)
        one_statement_at_a_time = db.session_factory(engine.execution_options(isolation_level="AUTOCOMMIT"))
        slots = AdmissionSlots(sessions, settings.max_running_lifecycles)
        activities = BusinessActivities(one_statement_at_a_time, topology, connection, slots, client)
        runner = workflow_runner(settings)
        for worker in (
            order_worker(client, settings.order_task_queue, activities, workflow_runner=runner),
            shipping_worker(client, settings.shipping_task_queue, activities, workflow_runner=runner),
        ):
            await stack.enter_async_context(worker)
        stop_reconciling = asyncio.Event()
        reconciling = asyncio.create_task(Reconciler(client, sessions, topology, slots).run(stop_reconciling))
        stack.push_async_callback(lambda: reconciling)
        stack.callback(stop_reconciling.set)
        yield
