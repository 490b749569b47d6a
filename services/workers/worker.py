"""The two Temporal workers of orderflow, ready to run in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import structlog
from temporalio import workflow
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from services.workers.activities import BusinessActivities
from services.workers.activity_interface import OrderActivities
from services.workers.order_workflow import OrderWorkflow
from services.workers.reconciler import Reconciler
from services.workers.shipping_workflow import ShippingWorkflow
from services.workers.visibility import SEARCH_ATTRIBUTES
from shared import broker, db
from shared.admission_table import AdmissionSlots
from shared.settings import Settings
from shared.temporal import tracing_interceptors

# pure modules imported once outside the sandbox, not again for every workflow run
SANDBOX_PASSTHROUGH = (
    "shared",
    "services.workers.activity_interface",
    "services.workers.admission_slot",
    "services.workers.order_state",
    "services.workers.outbox",
    "services.workers.shipment",
    "services.workers.steps",
    "services.workers.visibility",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    # the tracing interceptor's workflow side: one OpenTelemetry (its context, its tracer) for all
    "opentelemetry",
)

STICKY_QUEUE_TIMEOUT = timedelta(seconds=2)

# a lifecycle in a step holds a workflow task slot and a local activity slot: the defaults (100) cap too low
MAX_WORKFLOW_TASKS = 500
MAX_LOCAL_ACTIVITIES = 1000
MAX_ACTIVITIES = 100  # only publish_events runs as a regular activity: one batch of an order at a time

log = structlog.get_logger(__name__)


def sandbox_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*SANDBOX_PASSTHROUGH)
    )


def workflow_runner(settings: Settings) -> WorkflowRunner:
    """Without Temporal's sandbox unless `ORDERFLOW_WORKFLOW_SANDBOX`: it costs a quarter of the CPU per
    order (docs/performance.md), and the workflow and replay tests, which run in it, keep its guard."""
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
    return [activities.prepare_package_step, activities.dispatch_carrier_step]


def order_worker(client: Client, task_queue: str, activities: OrderActivities, **options: Any) -> Worker:
    return workflow_worker(client, task_queue, OrderWorkflow, order_activities(activities), **options)


def shipping_worker(client: Client, task_queue: str, activities: OrderActivities, **options: Any) -> Worker:
    # its activities are all local: no polls for remote activity tasks
    options.setdefault("no_remote_activities", True)
    return workflow_worker(client, task_queue, ShippingWorkflow, shipping_activities(activities), **options)


def workflow_worker(
    client: Client, task_queue: str, workflow_class: type, activities: Sequence[Activity], **options: Any
) -> Worker:
    """A worker as in production; `options` are `Worker`'s (the runner's default: the sandbox)."""
    options.setdefault("workflow_runner", sandbox_runner())
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[workflow_class],
        activities=activities,
        interceptors=tracing_interceptors(),
        max_concurrent_workflow_tasks=MAX_WORKFLOW_TASKS,
        max_concurrent_local_activities=MAX_LOCAL_ACTIVITIES,
        max_concurrent_activities=MAX_ACTIVITIES,
        # after a crash, a workflow's next task waits this long for the dead worker (default 10 s)
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
        **options,
    )


async def require_search_attributes(client: Client) -> None:
    """Stop at once if the namespace lacks the search attributes: each workflow task would fail instead."""
    request = ListSearchAttributesRequest(namespace=client.namespace)
    try:
        registered = (await client.operator_service.list_search_attributes(request)).custom_attributes
    except RPCError as error:  # a namespace that may not list them (a cloud API key's, say): go on
        log.warning("could not check the search attributes", error=repr(error))
        return
    missing = [key.name for key in SEARCH_ATTRIBUTES if key.name not in registered]
    if missing:
        raise RuntimeError(
            f"Temporal namespace {client.namespace!r} lacks the search attributes {', '.join(missing)}:"
            " create them (README, search attributes), then start the workers again"
        )


@asynccontextmanager
async def running_workers(client: Client, settings: Settings) -> AsyncIterator[None]:
    """Both workers polling, and the reconciler of terminated lifecycles beside them, until the block ends."""
    # the JSON log line carries the workflow's context as fields, not appended to the message
    workflow.logger.workflow_info_on_message = False
    await require_search_attributes(client)
    async with AsyncExitStack() as stack:
        engine = db.create_engine(settings)
        stack.push_async_callback(engine.dispose)
        connection = await broker.connect(settings, "workers")
        stack.push_async_callback(connection.close)
        channel, topology = await broker.open_channel(connection)
        await broker.declare_audit_queue(channel, topology, settings)
        sessions = db.session_factory(engine)
        # each write of a business function is one statement: autocommit spares its BEGIN and COMMIT
        one_statement_at_a_time = db.session_factory(engine.execution_options(isolation_level="AUTOCOMMIT"))
        slots = AdmissionSlots(sessions, settings.max_running_lifecycles)
        activities = BusinessActivities(one_statement_at_a_time, topology, connection, slots, client)
        options = {
            "workflow_runner": workflow_runner(settings),
            "graceful_shutdown_timeout": timedelta(seconds=settings.drain_seconds),
        }
        for worker in (
            order_worker(client, settings.order_task_queue, activities, **options),
            shipping_worker(client, settings.shipping_task_queue, activities, **options),
        ):
            await stack.enter_async_context(worker)
        stop_reconciling = asyncio.Event()
        reconciling = asyncio.create_task(Reconciler(client, sessions, topology, slots).run(stop_reconciling))
        stack.push_async_callback(lambda: reconciling)
        stack.callback(stop_reconciling.set)
        yield
