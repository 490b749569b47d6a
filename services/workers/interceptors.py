"""Ends an activity attempt in this worker when Temporal's start-to-close timeout ends it.

The server gives up on a hung attempt at its timeout and schedules the next one, but the attempt's
coroutine would go on sleeping here (the fault injector hangs for 300 s) and hold an activity slot
all that time. Cancelling it at the same deadline keeps the worker's slots for live attempts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)


class AttemptDeadlineInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _AttemptDeadline(next)


class _AttemptDeadline(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        timeout = activity.info().start_to_close_timeout
        try:
            async with asyncio.timeout(timeout.total_seconds() if timeout else None):
                return await super().execute_activity(input)
        except TimeoutError:
            seconds = timeout.total_seconds() if timeout else 0.0
            raise ApplicationError(f"attempt timed out after {seconds:g} s", type="AttemptTimedOut") from None
