"""How a workflow runs one business step (`run_step`): one local activity that runs the step's
attempts side by side in the worker (`attempts`, which owns them) and returns them with its result.

The workflow, not Temporal's retry policy, bounds a step: the fault injector hangs a third of the
attempts, so each gets a short timeout and the step counts its attempts and errors for the status.
Workflow code imports this module, so it holds no I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from services.workers.attempts import (
        DEADLINE_EXCEEDED,
        STEP_EXHAUSTED,
        AttemptLog,
        AttemptPlan,
        StepAttempts,
        StepDone,
        StepRun,
        deadline_reason,
    )
    from services.workers.boundary import OrderActivities
    from shared.contracts import Step
    from shared.lifecycle import LifecyclePolicy

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")

StepActivity = Callable[[OrderActivities, StepRun[P]], Awaitable[StepDone[R]]]
"""A business step's activity method of `OrderActivities`, e.g. `OrderActivities.charge_payment_step`."""

ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)
# beyond the step's own deadline check: the time its last attempt may take, and some slack
STEP_ACTIVITY_GRACE = timedelta(seconds=1)


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
    """How one business step is attempted (`attempts.attempt_step`): `parallel` attempts side by
    side, each cut at `attempt_timeout`, none started after `deadline` (workflow time).

    The step checks the deadline itself because while attempts are in flight the workflow task
    stays open, and a timer that fires meanwhile is only seen when the task ends.
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
