"""What the workflows and the activities exchange, and how a workflow runs one business step.

Workflow code imports this module, so it holds no I/O: activity names, their plain pydantic inputs
and outputs, and `run_step`, the retry loop every business step goes through.

Why the workflow retries instead of Temporal's server-side retry policy: the fault injector hangs a
third of the attempts, so each attempt gets a short start-to-close timeout and is retried at once;
doing that here lets the workflow count attempts, keep each attempt's error for the status query,
and log every retry with its attempt number.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from collections.abc import Callable

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from shared.contracts import Address, Step, StepError
    from shared.lifecycle import LifecyclePolicy


class Activities:
    """Activity names: the workflows call them by name; tests register mocks under them."""

    RECEIVE_ORDER = "receive_order"
    VALIDATE_ORDER = "validate_order"
    CHARGE_PAYMENT = "charge_payment"
    PREPARE_PACKAGE = "prepare_package"
    DISPATCH_CARRIER = "dispatch_carrier"
    MARK_SHIPPED = "mark_shipped"
    REFUND_PAYMENT = "refund_payment"
    PUBLISH_EVENTS = "publish_events"


ORDER_INVALID = "OrderInvalid"
"""ApplicationError type of a business-rule violation: not retried, the order fails."""


class ChargeRequest(BaseModel):
    order_id: str
    payment_id: str
    amount_cents: int


class ChargeResult(BaseModel):
    already_charged: bool


class DispatchRequest(BaseModel):
    order_id: str
    address: Address


class DispatchResult(BaseModel):
    tracking_number: str


class ShippingInput(BaseModel):
    order_id: str
    parent_workflow_id: str
    address: Address
    package_ready: bool
    policy: LifecyclePolicy


class ShippingResult(BaseModel):
    dispatched: bool
    tracking_number: str | None = None
    address: Address | None = None  # where the carrier was sent
    failure: str | None = None


class StepReport(BaseModel):
    """What the shipping child tells its parent about a step it ran (the parent owns the status)."""

    step: Step
    attempts: int
    errors: list[StepError] = []
    tracking_number: str | None = None
    address: Address | None = None  # where the carrier was sent
    reason: str | None = None


class StepExhausted(Exception):
    """A step used all the attempts its policy allows."""

    def __init__(self, step: Step, attempts: int, last_error: str) -> None:
        super().__init__(f"{step.value} failed {attempts} times; last error: {last_error}")
        self.last_error = last_error


@dataclass(frozen=True)
class StepPolicy:
    """How one business step is attempted.

    An attempt passes in milliseconds, fails at once, or hangs until `attempt_timeout` cuts it.
    `parallel` attempts run side by side and the first success wins; a failed attempt is replaced
    at once. Waiting out a hang is what makes a lifecycle slow, and with several attempts in
    flight a hang rarely delays the step. The business functions are idempotent and charging is safe under
    concurrency, so overlapping attempts have one effect. There is no pause between attempts: the
    server fires timers with about a second's granularity, and the lifecycle's deadline bounds the
    retrying anyway.
    """

    attempt_timeout: timedelta
    parallel: int = 1
    max_attempts: int | None = None  # None: keep trying until the lifecycle's deadline

    @classmethod
    def of(cls, lifecycle: LifecyclePolicy, max_attempts: int | None = None) -> StepPolicy:
        return cls(
            attempt_timeout=timedelta(seconds=lifecycle.activity_attempt_timeout_seconds),
            parallel=lifecycle.parallel_attempts,
            max_attempts=max_attempts,
        )


AttemptListener = Callable[[Step, int, str | None], None]
"""Called with (step, attempt, None) when an attempt starts and (step, attempt, error) when it
failed."""

RECENT_ERRORS = 10


class AttemptLog:
    """Attempts per step and the most recent errors of one order, logged as they happen.

    An `AttemptListener` for `run_step`; the order's status is read from it.
    """

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.attempts: dict[Step, int] = {}
        self.errors: list[StepError] = []

    def __call__(self, step: Step, attempt: int, error: str | None) -> None:
        if error is None:
            self.attempts[step] = attempt
            return
        self._keep([StepError(step=step, attempt=attempt, error=error, at=workflow.now())])
        workflow.logger.warning(
            "step attempt failed",
            extra={"order_id": self.order_id, "step": step.value, "attempt": attempt, "error": error},
        )

    def report(self, step: Step, **outcome: Any) -> StepReport:
        errors = [error for error in self.errors if error.step == step]
        return StepReport(step=step, attempts=self.attempts.get(step, 0), errors=errors, **outcome)

    def merge(self, report: StepReport) -> None:
        self.attempts[report.step] = self.attempts.get(report.step, 0) + report.attempts
        self._keep(report.errors)

    def _keep(self, errors: list[StepError]) -> None:
        self.errors = sorted([*self.errors, *errors], key=lambda error: error.at)[-RECENT_ERRORS:]


async def run_step(
    step: Step,
    activity: str,
    arg: Any,
    *,
    policy: StepPolicy,
    on_attempt: AttemptListener,
    result_type: type | None = None,
) -> Any:
    in_flight: dict[asyncio.Task[Any], int] = {}
    attempts = 0
    last_error = "no attempt made"

    def launch() -> None:
        nonlocal attempts
        attempts += 1
        on_attempt(step, attempts, None)
        attempt = asyncio.create_task(
            workflow.execute_activity(
                activity,
                arg,
                result_type=result_type,
                start_to_close_timeout=policy.attempt_timeout,
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        )
        # a losing attempt is cancelled; its outcome no longer matters
        attempt.add_done_callback(_discard_outcome)
        in_flight[attempt] = attempts

    try:
        while True:
            while len(in_flight) < policy.parallel and (
                policy.max_attempts is None or attempts < policy.max_attempts
            ):
                launch()
            if not in_flight:
                raise StepExhausted(step, attempts, last_error)
            done, _ = await workflow.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for finished in sorted(done, key=in_flight.__getitem__):  # deterministic order
                number = in_flight.pop(finished)
                try:
                    return finished.result()
                except ActivityError as err:
                    cause = err.cause
                    if isinstance(cause, ApplicationError) and cause.non_retryable:
                        raise
                    last_error = describe_failure(cause)
                    on_attempt(step, number, last_error)
    finally:
        for attempt in in_flight:
            attempt.cancel()


def _discard_outcome(attempt: asyncio.Task[Any]) -> None:
    if not attempt.cancelled():
        attempt.exception()


def describe_failure(cause: BaseException | None) -> str:
    if isinstance(cause, TimeoutError):
        return "attempt timed out"
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}" if cause.type else cause.message
    return str(cause) if cause else "unknown failure"
