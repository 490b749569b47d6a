"""What the workflows and the activities exchange, and how a workflow runs one business step.

Workflow code imports this module, so it holds no I/O: activity names, their plain pydantic inputs
and outputs, and `run_step`, the retry loop every business step goes through.

Why the workflow retries instead of Temporal's server-side retry policy: the fault injector hangs a
third of the attempts, so each attempt gets a short start-to-close timeout and is retried at once;
doing that here lets the workflow count attempts, keep each attempt's error for the status query,
and log every retry with its attempt number.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from shared.contracts import Address, Step, StepError


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
    attempt_timeout_seconds: float
    dispatch_attempts: int


class ShippingResult(BaseModel):
    dispatched: bool
    tracking_number: str | None = None
    failure: str | None = None


class StepReport(BaseModel):
    """What the shipping child tells its parent about a step it ran (the parent owns the status)."""

    step: Step
    attempts: int
    errors: list[StepError] = []
    tracking_number: str | None = None
    reason: str | None = None


class StepExhausted(Exception):
    """A step used all the attempts its policy allows."""

    def __init__(self, step: Step, attempts: int, last_error: str) -> None:
        super().__init__(f"{step.value} failed {attempts} times; last error: {last_error}")
        self.last_error = last_error


@dataclass(frozen=True)
class StepPolicy:
    """Timing of one business step. Attempts either pass in milliseconds, fail at once, or hang:
    a hang is cut at `attempt_timeout` and the next attempt starts right away. There is no pause
    between attempts: the server fires timers with about a second's granularity, which would cost
    more than the attempts themselves, and the lifecycle's deadline bounds the retrying anyway."""

    attempt_timeout: timedelta
    max_attempts: int | None = None  # None: keep trying until the lifecycle's deadline


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
    attempt = 0
    while True:
        attempt += 1
        on_attempt(step, attempt, None)
        try:
            return await workflow.execute_activity(
                activity,
                arg,
                result_type=result_type,
                start_to_close_timeout=policy.attempt_timeout,
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        except ActivityError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.non_retryable:
                raise
            error = describe_failure(cause)
            on_attempt(step, attempt, error)
            if policy.max_attempts is not None and attempt >= policy.max_attempts:
                raise StepExhausted(step, attempt, error) from err


def describe_failure(cause: BaseException | None) -> str:
    if isinstance(cause, TimeoutError):
        return "attempt timed out"
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}" if cause.type else cause.message
    return str(cause) if cause else "unknown failure"
