"""The order's admission slot as its workflow holds it: given back while a person reviews the
order, regained once approved (ahead of waiting placements), released when the lifecycle ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, suppress
from datetime import datetime, timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from services.workers.boundary import AdmissionInput, OrderActivities
    from shared.contracts import OrderStatus

In = TypeVar("In", bound=BaseModel)
T = TypeVar("T")

# not fault-injected, so retried in the worker until done; the backoff stays below the local
# retry threshold (60 s), so Core never turns it into a timer
MUST_GET_THROUGH_ATTEMPT = timedelta(seconds=5)
MUST_GET_THROUGH_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2)
)
# an approved order waiting for a slot asks again this often, should its wake-up be lost
SLOT_RECHECK = timedelta(seconds=5)


async def get_through(activity: Callable[[OrderActivities, In], Awaitable[T]], arg: In) -> T:
    """Run a local activity that must succeed (a refund, what happens to the slot)."""
    return await workflow.execute_local_activity_method(
        activity, arg, start_to_close_timeout=MUST_GET_THROUGH_ATTEMPT, retry_policy=MUST_GET_THROUGH_RETRY
    )


class AdmissionSlot:
    def __init__(self, status: OrderStatus, gathering: Callable[[], AbstractContextManager[None]]) -> None:
        self._status = status  # the order's, which shows its wait for a slot
        self._gathering = gathering
        self._input = AdmissionInput(order_id=status.order_id)
        self._woken = False

    def wake(self) -> None:
        """A freed slot may have gone to this order: ask the ledger again."""
        self._woken = True

    async def leave_for_review(
        self, approved: Callable[[], bool], grace_seconds: float, window_over: Callable[[], bool]
    ) -> bool:
        """Give the slot to another order while a person decides, unless approved within the
        grace (a reviewing service, say); True if it was given back."""
        with suppress(TimeoutError):
            await workflow.wait_condition(approved, timeout=grace_seconds)
        if approved() or window_over():
            return False
        await self._call(OrderActivities.leave_admission_for_review)
        return True

    async def regain(self) -> None:
        """Until the order holds a slot again; its wait shows in the status."""
        began = workflow.now()
        waited = False
        while True:
            self._woken = False  # before asking: a wake-up arriving meanwhile is not missed
            if await self._call(OrderActivities.resume_admission):
                break
            if not waited:
                self._log("waiting for a slot to go on", began)
                self._status.waiting_for_slot_since = began
                waited = True
            with suppress(TimeoutError):
                await workflow.wait_condition(lambda: self._woken, timeout=SLOT_RECHECK)
        if waited:
            self._status.waiting_for_slot_since = None
            self._log("slot regained", began)

    async def release(self) -> None:
        """The lifecycle has ended: give the slot back, or capacity is lost for good."""
        await self._call(OrderActivities.release_admission)

    async def _call(self, activity: Callable[[OrderActivities, AdmissionInput], Awaitable[T]]) -> T:
        with self._gathering():
            return await get_through(activity, self._input)

    def _log(self, message: str, began: datetime) -> None:
        workflow.logger.info(
            message,
            extra={
                "order_id": self._status.order_id,
                "step": self._status.step.value,
                "waited_seconds": round((workflow.now() - began).total_seconds(), 3),
            },
        )
