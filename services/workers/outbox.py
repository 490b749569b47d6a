"""An order's events, numbered without gaps; `publish` sends each batch once the workflow task that
emitted it is committed, so a task run again cannot have published events it then emits differently."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from services.workers.activity_interface import OrderActivities
    from services.workers.steps import UNTIL_DONE
    from shared.contracts import (
        ApproveOrder,
        CancelOrder,
        EventPayload,
        OrderEvent,
        PlaceOrder,
        UpdateAddress,
        event_of,
    )

Command = ApproveOrder | CancelOrder | UpdateAddress

PUBLISH_ATTEMPT = timedelta(seconds=5)
# a committed batch's fast path: a slow broker hands it to the regular activity (docs/performance.md)
PUBLISH_NOW_ATTEMPT = timedelta(seconds=2)
PUBLISH_NOW_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=2)


def current_task() -> int:
    """The workflow task running, named by the history length it began at."""
    return workflow.info().get_current_history_length()


def committed(task: int) -> bool:
    """Temporal starts a workflow task only after committing the one before."""
    return current_task() > task


class Outbox:
    def __init__(
        self, order: PlaceOrder, first_seq: int, on_batch: Callable[[], None] = lambda: None
    ) -> None:
        self._order = order
        self._on_batch = on_batch  # what goes with each batch, in its workflow task
        self._next_seq = first_seq
        self._pending: list[OrderEvent] = []
        self._closed = False
        self._local_work: list[int] = []  # the workflow task each running local activity began in
        self._held_until: Callable[[], bool] = lambda: True
        self._next_task_brings = -1  # the workflow task whose batch waits for the next one
        self.emitted: list[OrderEvent] = []

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def emit(self, data: EventPayload, command: Command | None = None) -> OrderEvent:
        event = event_of(
            data,
            event_id=workflow.uuid4(),
            order_id=self._order.order_id,
            seq=self._next_seq,
            occurred_at=workflow.now(),
            correlation_id=self._order.correlation_id,
            command_id=command.command_id if command else None,
        )
        self._next_seq += 1
        self._pending.append(event)
        self.emitted.append(event)
        return event

    @contextmanager
    def gathering(self) -> Iterator[None]:
        """Around a local activity: what its workflow task emits before, during and after goes out as one."""
        task = current_task()
        self._local_work.append(task)
        try:
            yield
        finally:
            self._local_work.remove(task)

    def hold_until(self, released: Callable[[], bool]) -> None:
        """What is pending waits until `released()`: a progress report goes with the outcome that follows."""
        self._held_until = released

    def close(self) -> None:
        """The lifecycle has ended: `publish` returns once the pending events are out (not later ones)."""
        self._closed = True

    def publish_in_next_task(self) -> None:
        """This task issues a command sure to bring the next one (a child's start): its batch waits for
        that task, the proof of its commit, and goes out there by a local activity."""
        self._next_task_brings = current_task()

    async def publish(self) -> None:
        while True:
            await self._batch_gathered()
            if not self._pending:
                return
            batch = self._pending
            self._pending = []
            self._on_batch()
            task = current_task()
            if task == self._next_task_brings:
                # unless the lifecycle ends in this very task, cancelling the start before it is sent
                await workflow.wait_condition(lambda: committed(task) or self._closed)  # noqa: B023
            if committed(task):
                await self._publish_now(batch)
            else:
                # the server creates an activity's task only once it has committed this one
                await self._publish_eventually(batch)

    async def _batch_gathered(self) -> None:
        """Until no local work keeps this task open and what this activation woke has had its turn."""
        while True:
            await workflow.wait_condition(self._batch_due)
            # a round more: what woke with us, and what it starts, runs on to its next wait first
            await workflow.wait_condition(lambda: True)
            if self._batch_due():
                return

    def _batch_due(self) -> bool:
        held = current_task() in self._local_work
        return self._closed or (bool(self._pending) and not held and self._held_until())

    async def _publish_eventually(self, batch: list[OrderEvent]) -> None:
        await workflow.execute_activity_method(
            OrderActivities.publish_events,
            batch,
            start_to_close_timeout=PUBLISH_ATTEMPT,
            retry_policy=UNTIL_DONE,  # while the broker is away the batch waits, and later ones behind it
        )

    async def _publish_now(self, batch: list[OrderEvent]) -> None:
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
                extra={"order_id": self._order.order_id, "seq": batch[0].seq, "error": str(err)},
            )
            await self._publish_eventually(batch)
