"""An order's outbox: its events, numbered without gaps, published in order by one loop.

Workflow code: `emit` appends an event, `publish` (a task beside the lifecycle) sends what has
accumulated, one batch at a time, until `close` and the last batch is out.

An event is published only once the workflow task that emitted it is committed to the history.
A task that fails (its worker died, it timed out, a signal landed as it completed the workflow)
is run again from the history, and signals that arrived meanwhile are then handled first: had
its events gone out, the rerun could emit other events under the same ids and seqs. So a batch
is published by a regular activity: the server creates its task only when it commits the
workflow task that scheduled it, which makes every pending event, that task's own included,
safe to send at once. A batch whose task issued a command sure to bring the next task (a child
workflow's start, `next_task_sure`) waits for that task instead: running in a later task proves
the commit, so it goes out there by a local activity, without an activity and a workflow task of
its own. (Lifecycles begun before `publish-by-activity` proved the commit with a timer, which
this server fires about a second late, and published every batch by a local activity; they keep
doing so.)

Each batch costs an activity and a workflow task to hear it is done, so a batch gathers what it
can: all that one workflow task emits, the local steps it runs in between included
(`gathering`), and a progress report with the outcome that soon follows it (`hold_until`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

PUBLISH_ATTEMPT = timedelta(seconds=5)
# retried without limit: while the broker is away the batch waits, and later ones behind it
PUBLISH_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2)
)
PUBLISH_BY_ACTIVITY_PATCH = "publish-by-activity"

# A batch known to be committed goes by a local activity, then by the regular activity above if
# the broker does not confirm it soon (lifecycles begun before `publish-by-activity` send every
# batch so). An attempt cut short sends its batch's first events again with the next one, which
# subscribers drop by event id: under a burst of 2,000 a few took over half a second, hence 2 s.
PUBLISH_NOW_ATTEMPT = timedelta(seconds=2)
PUBLISH_NOW_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=2)
COMMIT_TIMER = timedelta(milliseconds=1)
# and earlier still, events did not wait for their commit
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
        self._local_work: list[int] = []  # the workflow task (history length) each started in
        self._held_until: Callable[[], bool] = lambda: True
        self._by_activity: bool | None = None  # decided by the first `publish`
        self._next_task_publishing = False  # whether `next_task_sure` may be taken up
        self._next_task_sure_after = -1  # the workflow task (history length) that said so
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

    @contextmanager
    def gathering(self) -> Iterator[None]:
        """Around local work (a local activity): the workflow task that starts it stays open
        while it runs, so the events that task emits before, during and after it wait for it and
        go out in one batch. A later task (a signal while the work goes on) does not wait."""
        task = workflow.info().get_current_history_length()
        self._local_work.append(task)
        try:
            yield
        finally:
            self._local_work.remove(task)

    def hold_until(self, released: Callable[[], bool]) -> None:
        """What is pending waits until `released()`: a progress report goes out with the outcome
        that soon follows it, one batch (an activity and a workflow task) instead of two."""
        self._held_until = released

    def close(self) -> None:
        """The lifecycle has ended: `publish` returns once the pending events are out (later
        ones, rejections of commands that came too late, need another `publish`)."""
        self._closed = True

    def next_task_sure(self) -> None:
        """This workflow task issues a command whose outcome always brings the next one (a child
        workflow's start): what it emits can wait for that task, which proves it committed, and
        go out there by a local activity, without an activity and a workflow task of its own."""
        if self._next_task_publishing:
            self._next_task_sure_after = workflow.info().get_current_history_length()

    async def publish(self, *, events_in_shipment_start: bool = False) -> None:
        """`events_in_shipment_start`: the lifecycle took the workflow's patch that stands for
        every change up to publishing in the task a shipment's start brings."""
        if self._by_activity is None:
            self._by_activity = events_in_shipment_start or workflow.patched(PUBLISH_BY_ACTIVITY_PATCH)
            self._next_task_publishing = events_in_shipment_start
        by_activity = self._by_activity
        while True:
            if by_activity:
                await self._batch_gathered()
            else:
                await workflow.wait_condition(lambda: bool(self._pending) or self._closed)
            if not self._pending:
                return
            if not by_activity:
                await self._publish_now(PublishEventsInput(events=await self._committed_batch()))
                continue
            batch = PublishEventsInput(events=[pending.event for pending in self._pending])
            self._pending = []
            task = workflow.info().get_current_history_length()
            if task == self._next_task_sure_after:
                # The next task proves this one committed. But a lifecycle that ends in this very
                # task cancels its shipment's start before it is sent, and then none is sure.
                await workflow.wait_condition(lambda: self._task_committed(task) or self._closed)  # noqa: B023
            if self._task_committed(task):
                await self._publish_now(batch)
            else:
                await self._publish_eventually(batch)

    async def _batch_gathered(self) -> None:
        """Until the pending events can go with all this workflow task will add to them: no local
        work keeps the task open, and the coroutines this activation woke or started had their
        turn. (Batching only: an event that misses a batch goes in the next.)"""
        while True:
            await workflow.wait_condition(self._batch_due)
            # a round more: what woke with us, and what it starts, runs on to its next wait first
            await workflow.wait_condition(lambda: True)
            if self._batch_due():
                return

    def _batch_due(self) -> bool:
        held = workflow.info().get_current_history_length() in self._local_work
        return self._closed or (bool(self._pending) and not held and self._held_until())

    async def _publish_eventually(self, batch: PublishEventsInput) -> None:
        await workflow.execute_activity_method(
            OrderActivities.publish_events,
            batch,
            start_to_close_timeout=PUBLISH_ATTEMPT,
            retry_policy=PUBLISH_RETRY,
        )

    async def _publish_now(self, batch: PublishEventsInput) -> None:
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
            await self._publish_eventually(batch)

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
        return Outbox._task_committed(pending.emitted_in)

    @staticmethod
    def _task_committed(task: int) -> bool:
        """The workflow task `task` (its history length) is committed: a later one runs now."""
        return workflow.info().get_current_history_length() > task
