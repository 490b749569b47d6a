"""The outbox on its own, in a workflow that uses nothing else: the paths the lifecycle takes
only when commands land in one workflow task in an unlucky order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from services.workers.outbox import Outbox
from shared.contracts import EXAMPLE_DATA, EventType, OrderEvent, PlaceOrder
from testsupport.orders import place_order

TASK_QUEUE = "outbox-probe"


async def run_probe(
    client: Client,
    publish_events: Callable[[list[OrderEvent]], Awaitable[None]],
    probe: type,
    *children: type,
) -> None:
    """Run the `probe` workflow (by its class name) on a new order to its end, with `publish_events`."""
    async with Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[probe, *children],
        activities=[publish_events],
        workflow_runner=UnsandboxedWorkflowRunner(),  # as production runs it
    ):
        await client.execute_workflow(
            probe.__name__,
            place_order(),
            id=f"{probe.__name__}-{uuid.uuid4()}",
            task_queue=TASK_QUEUE,
            execution_timeout=timedelta(seconds=20),
        )


@workflow.defn(name="OutboxProbe")
class OutboxProbe:
    """Emits, says a next task is sure (as before a shipment's start), then ends in the same task
    without sending anything that would bring one: what a cancel does to an unsent start."""

    @workflow.run
    async def run(self, order: PlaceOrder) -> None:
        outbox = Outbox(order, first_seq=1)
        publisher = asyncio.create_task(outbox.publish())
        await workflow.wait_condition(lambda: True)  # the publisher has started, as in a lifecycle
        outbox.emit(EXAMPLE_DATA[EventType.SHIPPING_STARTED])
        outbox.publish_in_next_task()
        for _ in range(3):  # the publisher gathers for two rounds, then takes the batch
            await workflow.wait_condition(lambda: True)
        outbox.emit(EXAMPLE_DATA[EventType.CANCELLED])
        outbox.close()
        await publisher


async def test_a_batch_waiting_for_a_next_task_that_never_comes_goes_by_an_activity(
    temporal_client: Client,
) -> None:
    published: list[list[EventType]] = []

    @activity.defn(name="publish_events")
    async def publish_events(batch: list[OrderEvent]) -> None:
        published.append([event.type for event in batch])

    await run_probe(temporal_client, publish_events, OutboxProbe)

    assert published == [[EventType.SHIPPING_STARTED], [EventType.CANCELLED]]


@workflow.defn(name="CommitProbeChild")
class CommitProbeChild:
    @workflow.run
    async def run(self) -> None:
        return None


@workflow.defn(name="CommitProbe")
class CommitProbe:
    """Emits in the workflow task that starts a child, as a lifecycle starting a shipment does."""

    @workflow.run
    async def run(self, order: PlaceOrder) -> None:
        outbox = Outbox(order, first_seq=1)
        publisher = asyncio.create_task(outbox.publish())
        await workflow.wait_condition(lambda: True)
        outbox.emit(EXAMPLE_DATA[EventType.SHIPPING_STARTED])
        outbox.publish_in_next_task()
        await workflow.execute_child_workflow(CommitProbeChild.run, id=f"{workflow.info().workflow_id}-child")
        outbox.close()
        await publisher


async def test_a_batch_published_in_the_next_task_was_committed_before_it_went_out(
    temporal_client: Client,
) -> None:
    # the guarantee the outbox relies on: a later workflow task runs only once the earlier one,
    # the child's start it issued included, is in the history
    seen: list[tuple[bool, list[int]]] = []

    @activity.defn(name="publish_events")
    async def publish_events(batch: list[OrderEvent]) -> None:
        info = activity.info()
        assert info.workflow_id is not None
        history = await temporal_client.get_workflow_handle(info.workflow_id).fetch_history()
        seen.append((info.is_local, [event.event_type for event in history.events]))

    await run_probe(temporal_client, publish_events, CommitProbe, CommitProbeChild)

    assert len(seen) == 1
    local, history = seen[0]
    assert local, "went out by a local activity, in the task the child's start brought"
    assert HistoryEventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED in history
