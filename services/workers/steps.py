"""A business step: one local activity (`run_step`) whose attempts run side by side (`attempt_step`),
each cut at its timeout, a failed one replaced at once, the first success winning (docs/design.md).
The step, not Temporal's retry policy, bounds them: the fault injector hangs a third of the attempts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Generic, TypeVar

import structlog
from pydantic import BaseModel
from temporalio import exceptions, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

from shared.contracts import Step, StepError
from shared.lifecycle import LifecyclePolicy

if TYPE_CHECKING:
    from services.workers.activity_interface import OrderActivities

InputT = TypeVar("InputT")
ResultT = TypeVar("ResultT")

DEADLINE_EXCEEDED = "DeadlineExceeded"  # ApplicationError type: the lifecycle's deadline passed
STEP_EXHAUSTED = "StepExhausted"  # ApplicationError type: all `max_attempts` attempts failed
# ApplicationError type of an attempt that could not reach the database: it spends none of the bound
DEPENDENCY_UNAVAILABLE = "DependencyUnavailable"

FIRST_OUTAGE_BACKOFF_SECONDS = 0.2
MAX_OUTAGE_BACKOFF_SECONDS = 2.0
RECENT_ERRORS = 10  # how many of its latest errors a step reports, and an order's status keeps
ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)
# what must get through (a refund, the slot, an event batch): retried without limit, backing off
UNTIL_DONE = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=2))
# beyond the step's own deadline check: the time its last attempt may take, and some slack
STEP_ACTIVITY_GRACE = timedelta(seconds=1)

log = structlog.get_logger(__name__)


class AttemptPlan(BaseModel):
    """How one business step is attempted."""

    order_id: str
    step: Step
    parallel: int
    attempt_timeout_seconds: float
    time_left_seconds: float  # no attempt starts later than this: the lifecycle's deadline
    deadline_seconds: float  # the lifecycle's deadline, for the failure reason
    max_attempts: int | None = None  # None: keep trying until the deadline


class StepAttempts(BaseModel):
    """How a step went: how many attempts it made, and the latest of their errors."""

    step: Step
    attempts: int
    errors: list[StepError] = []


class StepRun(BaseModel, Generic[InputT]):
    plan: AttemptPlan
    input: InputT


class StepDone(BaseModel, Generic[ResultT]):
    """The winning attempt's result, and how the step went."""

    result: ResultT
    attempts: StepAttempts


StepActivity = Callable[["OrderActivities", StepRun[InputT]], Awaitable[StepDone[ResultT]]]
"""A business step's activity method of `OrderActivities`, e.g. `OrderActivities.charge_payment_step`."""


class AttemptLog:
    """Attempts per step and the most recent errors of one order; its status reads them."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.attempts: dict[Step, int] = {}
        self.errors: list[StepError] = []

    def report(self, step: Step) -> StepAttempts:
        errors = [error for error in self.errors if error.step == step]
        return StepAttempts(step=step, attempts=self.attempts.get(step, 0), errors=errors)

    def merge(self, report: StepAttempts) -> None:
        self.attempts[report.step] = self.attempts.get(report.step, 0) + report.attempts
        self.errors = sorted([*self.errors, *report.errors], key=lambda error: error.at)[-RECENT_ERRORS:]


def deadline_reason(step: str, deadline_seconds: float) -> str:
    return f"deadline_exceeded: step {step} still running after {deadline_seconds:g} s"


def describe_failure(error: BaseException) -> str:
    """An attempt's error as the status shows it."""
    if isinstance(error, TimeoutError | exceptions.TimeoutError):
        return "attempt timed out"
    if isinstance(error, ApplicationError):
        return f"{error.type}: {error.message}" if error.type else error.message
    return f"{type(error).__name__}: {error}"


async def run_step(
    step: Step,
    activity: StepActivity[InputT, ResultT],
    arg: InputT,
    *,
    policy: LifecyclePolicy,
    deadline: datetime,
    attempts: AttemptLog,
    max_attempts: int | None = None,
) -> ResultT:
    """The winning attempt's result, the attempts logged in `attempts`; a failed step raises its non-retryable
    error, `STEP_EXHAUSTED` or `DEADLINE_EXCEEDED` (checked by the step: its workflow task hides timers)."""
    time_left = max(deadline - workflow.now(), timedelta(0))
    plan = AttemptPlan(
        order_id=attempts.order_id,
        step=step,
        parallel=policy.parallel_attempts,
        attempt_timeout_seconds=policy.activity_attempt_timeout_seconds,
        time_left_seconds=time_left.total_seconds(),
        deadline_seconds=policy.lifecycle_deadline_seconds,
        max_attempts=max_attempts,
    )
    last_attempt = timedelta(seconds=policy.activity_attempt_timeout_seconds)
    try:
        done = await workflow.execute_local_activity_method(
            activity,
            StepRun[InputT](plan=plan, input=arg),
            start_to_close_timeout=time_left + last_attempt + STEP_ACTIVITY_GRACE,
            retry_policy=ONE_ATTEMPT,
            summary=step.value,
        )
    except (ActivityError, ApplicationError) as error:
        # a local activity's own error comes as it is; its timeout wrapped in an ActivityError
        failure = error.cause if isinstance(error, ActivityError) else error
        if not isinstance(failure, ApplicationError):  # Core cut it, the deadline long past
            reason = deadline_reason(step.value, policy.lifecycle_deadline_seconds)
            raise ApplicationError(reason, type=DEADLINE_EXCEEDED, non_retryable=True) from error
        if failure.details:
            attempts.merge(StepAttempts.model_validate(failure.details[0]))
        raise failure from None
    attempts.merge(done.attempts)
    return done.result


async def attempt_step(
    plan: AttemptPlan, attempt: Callable[[], Awaitable[ResultT]]
) -> tuple[ResultT, StepAttempts]:
    """Run `attempt()` as `plan` says until one succeeds; attempts in flight then are cancelled."""
    loop = asyncio.get_running_loop()
    no_attempt_after = loop.time() + plan.time_left_seconds
    in_flight: dict[asyncio.Task[ResultT], int] = {}
    errors: list[StepError] = []
    launched = outages = 0
    backoff_until = 0.0

    def report() -> StepAttempts:
        return StepAttempts(step=plan.step, attempts=launched, errors=errors[-RECENT_ERRORS:])

    def give_up(message: str, error_type: str | None) -> ApplicationError:
        details = report().model_dump(mode="json")
        return ApplicationError(message, details, type=error_type, non_retryable=True)

    try:
        while True:
            if not in_flight and loop.time() < backoff_until:
                await asyncio.sleep(backoff_until - loop.time())
            if loop.time() >= no_attempt_after:
                raise give_up(deadline_reason(plan.step.value, plan.deadline_seconds), DEADLINE_EXCEEDED)
            if loop.time() >= backoff_until:
                while len(in_flight) < plan.parallel and (
                    plan.max_attempts is None or launched - outages < plan.max_attempts
                ):
                    launched += 1
                    task = asyncio.create_task(asyncio.wait_for(attempt(), plan.attempt_timeout_seconds))
                    task.add_done_callback(_retrieve_error)
                    in_flight[task] = launched
            if not in_flight:
                last = errors[-1].error if errors else "no attempt made"
                message = f"{plan.step.value} failed {launched - outages} times; last error: {last}"
                raise give_up(message, STEP_EXHAUSTED)
            finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(finished, key=in_flight.__getitem__):
                number = in_flight.pop(task)
                error = task.exception()
                if error is None:
                    return task.result(), report()
                if isinstance(error, ApplicationError) and error.non_retryable:
                    raise give_up(error.message, error.type) from error
                errors.append(_failed_attempt(plan, number, error))
                if isinstance(error, ApplicationError) and error.type == DEPENDENCY_UNAVAILABLE:
                    outages += 1
                    backoff = FIRST_OUTAGE_BACKOFF_SECONDS * 2 ** (outages - 1)
                    backoff_until = loop.time() + min(backoff, MAX_OUTAGE_BACKOFF_SECONDS)
    finally:
        for task in in_flight:
            task.cancel()


async def run_attempts(
    run: StepRun[InputT], attempt: Callable[[InputT], Awaitable[ResultT]]
) -> StepDone[ResultT]:
    """A step's activity: `attempt(run.input)` as `run.plan` says."""
    result, attempts = await attempt_step(run.plan, lambda: attempt(run.input))
    return StepDone(result=result, attempts=attempts)


def _failed_attempt(plan: AttemptPlan, number: int, error: BaseException) -> StepError:
    described = describe_failure(error)
    log.warning(
        "step attempt failed", order_id=plan.order_id, step=plan.step.value, attempt=number, error=described
    )
    return StepError(step=plan.step, attempt=number, error=described, at=datetime.now(UTC))


def _retrieve_error(attempt: asyncio.Task[ResultT]) -> None:
    """A loser's error is nobody's news: read it, so asyncio does not report it as never read."""
    if not attempt.cancelled():
        attempt.exception()
