"""An order's outbox: its events, numbered without gaps, published in order by one loop.

Workflow code: `emit` appends an event, `publish` (a task beside the lifecycle) sends what has
accumulated, one batch at a time, until `close` and the last batch is out.
"""

from __future__ import annotations

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
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(milliseconds=400), maximum_attempts=4
)
PUBLISH_EVENTUALLY_ATTEMPT = timedelta(seconds=5)
PUBLISH_EVENTUALLY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2)
)


class Outbox:
    def __init__(self, order: PlaceOrder, first_seq: int) -> None:
        self._order = order
        self._next_seq = first_seq
        self._pending: list[OrderEvent] = []
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
        self._pending.append(event)
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
            batch, self._pending = PublishEventsInput(events=self._pending), []
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
