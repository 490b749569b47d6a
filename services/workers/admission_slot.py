"""The order's admission slot as its workflow holds it: given back while a person reviews the
order, regained once approved (ahead of waiting placements), released when the lifecycle ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, suppress
from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from services.workers.activity_interface import OrderActivities
    from services.workers.steps import UNTIL_DONE, InputT, ResultT
    from shared.contracts import OrderStatus

# not fault-injected: retried in the worker (`UNTIL_DONE` backs off below Core's local retry threshold, 60 s)
MUST_GET_THROUGH_ATTEMPT = timedelta(seconds=5)
# an approved order waiting for a slot asks again this often, should its wake-up be lost
SLOT_RECHECK = timedelta(seconds=5)


async def get_through(
    activity: Callable[[OrderActivities, InputT], Awaitable[ResultT]], arg: InputT
) -> ResultT:
    """Run a local activity that must succeed (a refund, what happens to the slot)."""
    return await workflow.execute_local_activity_method(
        activity, arg, start_to_close_timeout=MUST_GET_THROUGH_ATTEMPT, retry_policy=UNTIL_DONE
    )


class AdmissionSlot:
    def __init__(self, status: OrderStatus, gathering: Callable[[], AbstractContextManager[None]]) -> None:
        self._status = status  # the order's, which shows its wait for a slot
        self._gathering = gathering
        self._woken = False

    def wake(self) -> None:
        """A freed slot may have gone to this order: ask the ledger again."""
        self._woken = True

    async def leave_for_review(
        self, approved: Callable[[], bool], grace_seconds: float, window_over: Callable[[], bool]
    ) -> bool:
        """Give the slot to another order while a person decides, unless approved within the grace."""
        with suppress(TimeoutError):
            await workflow.wait_condition(approved, timeout=grace_seconds)
        if approved() or window_over():
            return False
        await self._call(OrderActivities.leave_admission_for_review)
        return True

    async def regain(self) -> None:
        """Until the order holds a slot again; its wait shows in the status."""
        began = workflow.now()
        while True:
            self._woken = False  # before asking: a wake-up arriving meanwhile is not missed
            if await self._call(OrderActivities.resume_admission):
                break
            if self._status.waiting_for_slot_since is None:
                self._log("waiting for a slot to go on", began)
                self._status.waiting_for_slot_since = began
            with suppress(TimeoutError):
                await workflow.wait_condition(lambda: self._woken, timeout=SLOT_RECHECK)
        if self._status.waiting_for_slot_since is not None:
            self._status.waiting_for_slot_since = None
            self._log("slot regained", began)

    async def release(self) -> None:
        """The lifecycle has ended: give the slot back, or capacity is lost for good."""
        await self._call(OrderActivities.release_admission)

    async def _call(self, activity: Callable[[OrderActivities, str], Awaitable[ResultT]]) -> ResultT:
        with self._gathering():
            return await get_through(activity, self._status.order_id)

    def _log(self, message: str, began: datetime) -> None:
        waited = round((workflow.now() - began).total_seconds(), 3)
        extra = {"order_id": self._status.order_id, "step": self._status.step.value, "waited_seconds": waited}
        workflow.logger.info(message, extra=extra)
