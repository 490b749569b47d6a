"""The outbox on its own, in a workflow that uses nothing else: the paths the lifecycle takes
only when commands land in one workflow task in an unlucky order."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from services.workers.boundary import PublishEventsInput
from services.workers.outbox import Outbox
from shared.contracts import EventType, PlaceOrder
from workflow_harness import place_order, unique_order_id

TASK_QUEUE = "outbox-probe"


@workflow.defn(name="OutboxProbe")
class OutboxProbe:
    """Emits, says a next task is sure (as before a shipment's start), then ends in the same task
    without sending anything that would bring one: what a cancel does to an unsent start."""

    @workflow.run
    async def run(self, order: PlaceOrder) -> None:
        outbox = Outbox(order, first_seq=1)
        publisher = asyncio.create_task(outbox.publish(events_in_shipment_start=True))
        await workflow.wait_condition(lambda: True)  # the publisher has started, as in a lifecycle
        outbox.emit(EventType.SHIPPING_STARTED)
        outbox.next_task_sure()
        for _ in range(3):  # the publisher gathers for two rounds, then takes the batch
            await workflow.wait_condition(lambda: True)
        outbox.emit(EventType.CANCELLED)
        outbox.close()
        await publisher


async def test_a_batch_waiting_for_a_next_task_that_never_comes_goes_by_an_activity(
    temporal_client: Client,
) -> None:
    published: list[list[EventType]] = []

    @activity.defn(name="publish_events")
    async def publish_events(batch: PublishEventsInput) -> None:
        published.append([event.type for event in batch.events])

    async with Worker(
        temporal_client,
        task_queue=TASK_QUEUE,
        workflows=[OutboxProbe],
        activities=[publish_events],
        workflow_runner=UnsandboxedWorkflowRunner(),  # as production runs it
    ):
        await temporal_client.execute_workflow(
            OutboxProbe.run,
            place_order(unique_order_id()),
            id=f"outbox-probe-{uuid.uuid4()}",
            task_queue=TASK_QUEUE,
            execution_timeout=timedelta(seconds=20),
        )

    assert published == [[EventType.SHIPPING_STARTED], [EventType.CANCELLED]]
