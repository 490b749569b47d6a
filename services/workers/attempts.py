"""A business step's attempts, all in this module: how the workflow asks for them (`AttemptPlan`
in a `StepRun`), how they run side by side inside the step's one local activity (`attempt_step`:
each cut at its timeout, a failed one replaced at once, the first success wins; docs/design.md),
and how they are reported (`StepAttempts`) and kept per order (`AttemptLog`).

Failures come back as non-retryable `ApplicationError`s carrying the step's `StepAttempts`: the
business error as raised, `STEP_EXHAUSTED`, or `DEADLINE_EXCEEDED`. An attempt that found the
database down (`DEPENDENCY_UNAVAILABLE`) spends none of the step's bound; the next waits longer.
Workflows import this module (passed through their sandbox): its workflow-side parts do no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

import structlog
from pydantic import BaseModel
from temporalio import exceptions
from temporalio.exceptions import ApplicationError

from shared.contracts import Step, StepError

T = TypeVar("T")
P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")

DEADLINE_EXCEEDED = "DeadlineExceeded"
"""ApplicationError type of a step given up at the lifecycle's deadline."""
STEP_EXHAUSTED = "StepExhausted"
"""ApplicationError type of a step whose attempts all failed (`max_attempts` of them)."""
DEPENDENCY_UNAVAILABLE = "DependencyUnavailable"
"""ApplicationError type of an attempt that could not reach the database: not the step's fault."""

FIRST_OUTAGE_BACKOFF_SECONDS = 0.2
MAX_OUTAGE_BACKOFF_SECONDS = 2.0
RECENT_ERRORS = 10
"""How many of its latest errors a step reports (and an order's status keeps)."""

log = structlog.get_logger(__name__)


class AttemptPlan(BaseModel):
    """How one business step is attempted (the workflow's `StepPolicy`, for one run of it)."""

    order_id: str
    step: Step
    parallel: int
    attempt_timeout_seconds: float
    time_left_seconds: float
    """No attempt starts later than this after the step began: the lifecycle's deadline."""
    deadline_seconds: float
    """The lifecycle's deadline, for the failure reason."""
    max_attempts: int | None = None
    """None: keep trying until the deadline."""


class StepAttempts(BaseModel):
    """How a step went: how many attempts it made, and the latest of their errors."""

    step: Step
    attempts: int
    errors: list[StepError] = []


class StepRun(BaseModel, Generic[P]):
    """One business step, as its activity gets it: its input, and how to attempt it."""

    plan: AttemptPlan
    input: P


class StepDone(BaseModel, Generic[R]):
    """A business step that succeeded: the winning attempt's result, and how the step went."""

    result: R
    attempts: StepAttempts


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
        self._keep(report.errors)

    def _keep(self, errors: list[StepError]) -> None:
        self.errors = sorted([*self.errors, *errors], key=lambda error: error.at)[-RECENT_ERRORS:]


def deadline_reason(step: str, deadline_seconds: float) -> str:
    return f"deadline_exceeded: step {step} still running after {deadline_seconds:g} s"


def describe_failure(error: BaseException | None) -> str:
    """An attempt's error as the status shows it."""
    if isinstance(error, TimeoutError | exceptions.TimeoutError):
        return "attempt timed out"
    if isinstance(error, ApplicationError):
        return f"{error.type}: {error.message}" if error.type else error.message
    if error is None:
        return "unknown failure"
    return f"{type(error).__name__}: {error}"


def outage_backoff_seconds(outages: int) -> float:
    return float(min(FIRST_OUTAGE_BACKOFF_SECONDS * 2 ** (outages - 1), MAX_OUTAGE_BACKOFF_SECONDS))


async def attempt_step(plan: AttemptPlan, attempt: Callable[[], Awaitable[T]]) -> tuple[T, StepAttempts]:
    """Run `attempt()` as `plan` says until one succeeds; its result and how the step went.

    Raises a non-retryable ApplicationError carrying the `StepAttempts` when the step fails.
    Attempts still in flight when the step is decided (or the activity cancelled) are cancelled.
    """
    loop = asyncio.get_running_loop()
    no_attempt_after = loop.time() + plan.time_left_seconds
    in_flight: dict[asyncio.Task[T], int] = {}
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
                    backoff_until = loop.time() + outage_backoff_seconds(outages)
    finally:
        for task in in_flight:
            task.cancel()


async def run_attempts(run: StepRun[P], attempt: Callable[[P], Awaitable[R]]) -> StepDone[R]:
    """A step's activity: `attempt(run.input)` as `run.plan` says (`attempt_step`)."""
    result, attempts = await attempt_step(run.plan, lambda: attempt(run.input))
    return StepDone(result=result, attempts=attempts)


def _failed_attempt(plan: AttemptPlan, number: int, error: BaseException) -> StepError:
    described = describe_failure(error)
    log.warning(
        "step attempt failed", order_id=plan.order_id, step=plan.step.value, attempt=number, error=described
    )
    return StepError(step=plan.step, attempt=number, error=described, at=datetime.now(UTC))


def _retrieve_error(attempt: asyncio.Task[T]) -> None:
    """A loser's error is nobody's news: read it, so asyncio does not report it as never read."""
    if not attempt.cancelled():
        attempt.exception()
