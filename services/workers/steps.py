"""How a workflow runs one business step (`run_step`).

Why the workflow retries instead of Temporal's retry policy: the fault injector hangs a third of the
attempts, so each attempt gets a short timeout and several run side by side; the step counts its
attempts and keeps their errors for the status query.

A step is one local activity (`OrderActivities.*_step`) that runs the attempts in the worker
(`hedging.attempt_step`): it leaves one marker in the history, with the step's attempts and errors
(which the Temporal UI shows), and costs one activity task and one activation. Lifecycles begun
before that (`STEP_IN_ONE_ACTIVITY_PATCH`) run each attempt as a local activity of its own, from
the workflow (`run_step_per_attempt_activities`), and replay that way.

Replay of those: each local-activity marker must meet the same local activity (by sequence number)
when the workflow replays, or Core fails the task ("Missing associated machine for
LocalActivity(n)"). Two known ways to get there: a local retry whose backoff exceeds the local retry
threshold, which Core turns into a workflow timer and a new sequence number that a cancel can then
name before Core knows it; and reacting to finished attempts in an order that depends on how they
were grouped into activations (Core replays them in marker order). Those attempts never retry
locally, and `run_step_per_attempt_activities` reacts to each attempt in the order they finished.

Workflow code imports this module, so it holds no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from services.workers.boundary import StepDone, StepRun
    from services.workers.hedging import (
        DEADLINE_EXCEEDED,
        DEPENDENCY_UNAVAILABLE,
        RECENT_ERRORS,
        STEP_EXHAUSTED,
        AttemptPlan,
        StepAttempts,
        deadline_reason,
        describe_failure,
        outage_backoff_seconds,
    )
    from shared.contracts import Step, StepError
    from shared.lifecycle import LifecyclePolicy

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")

StepActivity = Callable[[Any, StepRun[P]], Awaitable[StepDone[R]]]
"""A business step's activity method of `OrderActivities`, e.g. `OrderActivities.charge_payment_step`."""
Activity = Callable[[Any, P], Awaitable[R]]
"""A one-attempt activity method of `OrderActivities`, e.g. `OrderActivities.charge_payment`."""

ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)
# beyond the step's own deadline check: the time its last attempt may take, and some slack
STEP_ACTIVITY_GRACE = timedelta(seconds=1)
# lifecycles begun while each attempt was a local activity of its own keep running that way
STEP_IN_ONE_ACTIVITY_PATCH = "step-in-one-activity"


class StepDeadlineExceeded(ApplicationError):
    """The lifecycle's deadline passed while the step was still being attempted."""

    def __init__(self, step: Step, deadline_seconds: float) -> None:
        super().__init__(
            deadline_reason(step.value, deadline_seconds), type=DEADLINE_EXCEEDED, non_retryable=True
        )


class StepExhausted(Exception):
    """A step used all the attempts its policy allows."""

    def __init__(self, step: Step, reason: str) -> None:
        super().__init__(reason)
        self.step = step


@dataclass(frozen=True)
class StepPolicy:
    """How one business step is attempted.

    An attempt passes in milliseconds, fails at once, or hangs until `attempt_timeout` cuts it.
    `parallel` attempts run side by side and the first success wins; a failed attempt is replaced
    at once, without a pause: waiting out a hang is what makes a lifecycle slow, and with several
    attempts in flight a hang rarely delays the step. The business functions are idempotent and
    charging is safe under concurrency, so overlapping attempts have one effect.

    No attempt starts after `deadline` (workflow time): the step fails with `StepDeadlineExceeded`.
    The step checks this itself because while attempts are in flight the workflow task stays open,
    and a timer that fires meanwhile is only seen when the task ends.
    """

    attempt_timeout: timedelta
    deadline: datetime
    deadline_seconds: float  # the lifecycle's deadline, for the failure reason
    parallel: int = 1
    max_attempts: int | None = None  # None: keep trying until the deadline

    @classmethod
    def of(
        cls, lifecycle: LifecyclePolicy, deadline: datetime, max_attempts: int | None = None
    ) -> StepPolicy:
        return cls(
            attempt_timeout=timedelta(seconds=lifecycle.activity_attempt_timeout_seconds),
            deadline=deadline,
            deadline_seconds=lifecycle.lifecycle_deadline_seconds,
            parallel=lifecycle.parallel_attempts,
            max_attempts=max_attempts,
        )


AttemptListener = Callable[[Step, int, str | None], None]
"""Called with (step, attempt, None) when an attempt starts and (step, attempt, error) when it
failed."""


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

    def report(self, step: Step) -> StepAttempts:
        errors = [error for error in self.errors if error.step == step]
        return StepAttempts(step=step, attempts=self.attempts.get(step, 0), errors=errors)

    def merge(self, report: StepAttempts) -> None:
        self.attempts[report.step] = self.attempts.get(report.step, 0) + report.attempts
        self._keep(report.errors)

    def _keep(self, errors: list[StepError]) -> None:
        self.errors = sorted([*self.errors, *errors], key=lambda error: error.at)[-RECENT_ERRORS:]


async def run_step(
    step: Step, activity: StepActivity[P, R], arg: P, *, policy: StepPolicy, attempts: AttemptLog
) -> R:
    """Run the step's activity, which attempts `arg` as `policy` says; the result of the attempt
    that succeeded. The step's attempts and errors go to `attempts`, whatever the outcome.

    Raises the ApplicationError of an attempt that failed for good (a non-retryable one),
    `StepExhausted` when `policy.max_attempts` failed, `StepDeadlineExceeded` at the deadline.
    """
    time_left = max(policy.deadline - workflow.now(), timedelta(0))
    plan = AttemptPlan(
        order_id=attempts.order_id,
        step=step,
        parallel=policy.parallel,
        attempt_timeout_seconds=policy.attempt_timeout.total_seconds(),
        time_left_seconds=time_left.total_seconds(),
        deadline_seconds=policy.deadline_seconds,
        max_attempts=policy.max_attempts,
    )
    try:
        done = await workflow.execute_local_activity_method(
            activity,
            StepRun[P](plan=plan, input=arg),
            start_to_close_timeout=time_left + policy.attempt_timeout + STEP_ACTIVITY_GRACE,
            retry_policy=ONE_ATTEMPT,
            summary=step.value,
        )
    except (ActivityError, ApplicationError) as error:
        # a local activity's own error comes as it is; its timeout wrapped in an ActivityError
        failure = error.cause if isinstance(error, ActivityError) else error
        if not isinstance(failure, ApplicationError):  # Core cut it, the deadline long past
            raise StepDeadlineExceeded(step, policy.deadline_seconds) from error
        if failure.details:
            attempts.merge(StepAttempts.model_validate(failure.details[0]))
        if failure.type == DEADLINE_EXCEEDED:
            raise StepDeadlineExceeded(step, policy.deadline_seconds) from error
        if failure.type == STEP_EXHAUSTED:
            raise StepExhausted(step, failure.message) from error
        raise failure from None
    attempts.merge(done.attempts)
    return done.result


async def run_step_per_attempt_activities(
    step: Step,
    activity: Activity[P, R],
    arg: P,
    *,
    policy: StepPolicy,
    on_attempt: AttemptListener,
) -> R:
    """Attempt `activity(arg)` as `policy` says; the first attempt that succeeds gives the result.

    Raises the ApplicationError of an attempt that failed for good (a non-retryable one),
    `StepExhausted` when `policy.max_attempts` failed, `StepDeadlineExceeded` at the deadline.
    Losing attempts still in flight are cancelled.

    Each finished attempt is dealt with in a callback, in the order the attempts finished: what
    the step does next (replace it, win, give up) then depends on that order alone, which a replay
    reproduces from the markers, and not on how finished attempts were grouped into activations.
    """
    outcome: asyncio.Future[R] = asyncio.get_running_loop().create_future()
    in_flight: dict[int, workflow.ActivityHandle[R]] = {}
    launched = 0
    outages = 0  # attempts that failed because the database was down: they spend no bound
    backoff: asyncio.Task[None] | None = None
    last_error = "no attempt made"

    def launch() -> None:
        nonlocal launched
        launched += 1
        number = launched
        on_attempt(step, number, None)
        attempt = workflow.start_local_activity_method(
            activity,
            arg,
            start_to_close_timeout=policy.attempt_timeout,
            retry_policy=ONE_ATTEMPT,
            summary=f"{step.value} attempt {number}",
        )
        in_flight[number] = attempt
        attempt.add_done_callback(lambda finished: settle(number, finished))

    def settle(number: int, attempt: workflow.ActivityHandle[R]) -> None:
        nonlocal last_error
        del in_flight[number]
        if attempt.cancelled():
            return
        error = attempt.exception()  # read even for a loser, so asyncio does not report it
        if outcome.done():
            return  # a loser, cancelled when the step was decided
        if error is None:
            outcome.set_result(attempt.result())
            return
        # a local activity's own error comes as it is; its timeout wrapped in an ActivityError
        cause = error.cause if isinstance(error, ActivityError) else error
        if isinstance(cause, ApplicationError) and cause.non_retryable:
            outcome.set_exception(cause)
            return
        last_error = describe_failure(cause)
        on_attempt(step, number, last_error)
        if isinstance(cause, ApplicationError) and cause.type == DEPENDENCY_UNAVAILABLE:
            back_off()
        else:
            refill()

    def back_off() -> None:
        """The database is down: attempting again at once would fail at once, so wait a little
        (longer each time, one wait for all the attempts that failed alike)."""
        nonlocal outages, backoff
        outages += 1
        if backoff is None:
            backoff = asyncio.create_task(refill_after(timedelta(seconds=outage_backoff_seconds(outages))))

    async def refill_after(delay: timedelta) -> None:
        nonlocal backoff
        await workflow.sleep(delay)
        backoff = None
        if not outcome.done():
            refill()

    def refill() -> None:
        if workflow.now() >= policy.deadline:
            outcome.set_exception(StepDeadlineExceeded(step, policy.deadline_seconds))
            return
        if backoff is not None:
            return  # the wait refills when it ends
        while len(in_flight) < policy.parallel and (
            policy.max_attempts is None or launched - outages < policy.max_attempts
        ):
            launch()
        if not in_flight:
            reason = f"{step.value} failed {launched - outages} times; last error: {last_error}"
            outcome.set_exception(StepExhausted(step, reason))

    refill()
    try:
        return await outcome
    finally:
        outcome.cancel()  # decided or abandoned: a loser's end must not launch another attempt
        for attempt in in_flight.values():
            attempt.cancel()
        if backoff is not None:
            backoff.cancel()
