"""An order's outbox: its events, numbered without gaps, published in order by one loop.

Workflow code: `emit` appends an event, `publish` (a task beside the lifecycle) sends what has
accumulated, one batch at a time, until `close` and the last batch is out.

An event is published only once the workflow task that emitted it is committed to the history.
A task that fails (its worker died, it timed out, a signal landed as it completed the workflow)
is run again from the history, and signals that arrived meanwhile are then handled first: had
its events gone out, the rerun could emit other events under the same ids and seqs. A later task
having started is the proof of commit; when none starts soon (the order waits for a reviewer,
say), a short timer ends the task and starts the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from services.workers.boundary import OrderActivities, PublishEventsInput
    from shared.contracts import (
        ApproveOrder,
        CancelOrder,
        EventType,
        OrderEvent,
        PlaceOrder,
        UpdateAddress,
    )

Command = ApproveOrder | CancelOrder | UpdateAddress

# A batch is first published by a local activity: the broker confirms in milliseconds, and that
# costs one marker and no round trip. While the broker is away that activity gives up after a few
# quick attempts (about a second; its schedule-to-close timeout does not bound a local activity's
# retries), so it never holds the workflow task, and the signals and timers waiting behind it, for
# long; the batch then goes to a regular activity that retries without limit in the background.
# Later batches wait for it: events reach the broker in order.
PUBLISH_NOW_ATTEMPT = timedelta(milliseconds=500)
PUBLISH_NOW_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100),
    maximum_interval=timedelta(milliseconds=400),
    maximum_attempts=4,
)
PUBLISH_EVENTUALLY_ATTEMPT = timedelta(seconds=5)
PUBLISH_EVENTUALLY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2)
)
COMMIT_TIMER = timedelta(milliseconds=1)
# lifecycles that began before events waited for their commit keep publishing as recorded
PUBLISH_COMMITTED_PATCH = "publish-committed-events"


@dataclass(frozen=True)
class Pending:
    event: OrderEvent
    emitted_in: int
    """The history length when the event was emitted: it identifies the emitting workflow task."""


class Outbox:
    def __init__(self, order: PlaceOrder, first_seq: int) -> None:
        self._order = order
        self._next_seq = first_seq
        self._pending: list[Pending] = []
        self._closed = False
        self.emitted: list[OrderEvent] = []

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def emit(self, event_type: EventType, command: Command | None = None, **data: Any) -> OrderEvent:
        event = OrderEvent(
            event_id=workflow.uuid4(),
            type=event_type,
            order_id=self._order.order_id,
            seq=self._next_seq,
            occurred_at=workflow.now(),
            correlation_id=self._order.correlation_id,
            command_id=command.command_id if command else None,
            data=data,
        )
        self._next_seq += 1
        self._pending.append(Pending(event, workflow.info().get_current_history_length()))
        self.emitted.append(event)
        return event

    def close(self) -> None:
        """The lifecycle has ended: `publish` returns once the pending events are out (later
        ones, rejections of commands that came too late, need another `publish`)."""
        self._closed = True

    async def publish(self) -> None:
        while True:
            await workflow.wait_condition(lambda: bool(self._pending) or self._closed)
            if not self._pending:
                return
            batch = PublishEventsInput(events=await self._committed_batch())
            try:
                await workflow.execute_local_activity_method(
                    OrderActivities.publish_events,
                    batch,
                    start_to_close_timeout=PUBLISH_NOW_ATTEMPT,
                    retry_policy=PUBLISH_NOW_RETRY,
                )
            except (ActivityError, ApplicationError) as err:  # gave up: timed out, or failed for good
                workflow.logger.warning(
                    "publishing events in the background",
                    extra={"order_id": self._order.order_id, "seq": batch.events[0].seq, "error": str(err)},
                )
                await workflow.execute_activity_method(
                    OrderActivities.publish_events,
                    batch,
                    start_to_close_timeout=PUBLISH_EVENTUALLY_ATTEMPT,
                    retry_policy=PUBLISH_EVENTUALLY_RETRY,
                )

    async def _committed_batch(self) -> list[OrderEvent]:
        """Take the pending events whose workflow task is committed, waiting for that if need be."""
        if not workflow.patched(PUBLISH_COMMITTED_PATCH):
            batch, self._pending = [pending.event for pending in self._pending], []
            return batch
        if not self._committed(self._pending[0]):
            await workflow.sleep(COMMIT_TIMER)
        committed = [pending for pending in self._pending if self._committed(pending)]
        self._pending = self._pending[len(committed) :]
        return [pending.event for pending in committed]

    @staticmethod
    def _committed(pending: Pending) -> bool:
        return workflow.info().get_current_history_length() > pending.emitted_in
