"""A business step's attempts inside its one local activity (`steps.attempt_step`), on their own:
plain asyncio, the attempts scripted; and an order's log of them (`steps.AttemptLog`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.exceptions import ApplicationError

from services.workers.steps import (
    DEADLINE_EXCEEDED,
    DEPENDENCY_UNAVAILABLE,
    RECENT_ERRORS,
    STEP_EXHAUSTED,
    AttemptLog,
    AttemptPlan,
    StepAttempts,
    attempt_step,
)
from shared.contracts import Step, StepError

Attempt = Callable[[], Awaitable[str]]


def plan(**overrides: object) -> AttemptPlan:
    settings: dict[str, object] = {
        "order_id": "o-1",
        "step": Step.CHARGE_PAYMENT,
        "parallel": 3,
        "attempt_timeout_seconds": 0.2,
        "time_left_seconds": 5.0,
        "deadline_seconds": 14.0,
    }
    return AttemptPlan.model_validate(settings | overrides)


class Script:
    """Attempts that play the given behaviours in turn (the last one from then on)."""

    def __init__(self, *behaviours: Attempt) -> None:
        self._behaviours: Iterator[Attempt] = iter(behaviours)
        self._last = behaviours[-1]
        self.started = 0
        self.cancelled = 0

    async def __call__(self) -> str:
        self.started += 1
        behaviour = next(self._behaviours, self._last)
        try:
            return await behaviour()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def passes() -> str:
    return "done"


async def fails() -> str:
    raise RuntimeError("Forced failure for testing")


async def hangs() -> str:
    await asyncio.sleep(300)
    return "too late"


async def database_down() -> str:
    raise ApplicationError("connection refused", type=DEPENDENCY_UNAVAILABLE)


def invalid(error_type: str) -> Attempt:
    async def behaviour() -> str:
        raise ApplicationError("order broken", type=error_type, non_retryable=True)

    return behaviour


def reported(error: ApplicationError) -> StepAttempts:
    return StepAttempts.model_validate(error.details[0])


async def test_the_first_success_wins_and_the_hung_attempts_are_cancelled() -> None:
    attempts = Script(hangs, hangs, passes)

    result, report = await attempt_step(plan(), attempts)

    assert result == "done"
    assert (report.step, report.attempts, report.errors) == (Step.CHARGE_PAYMENT, 3, [])
    await asyncio.sleep(0.01)  # the losers' cancellation is delivered
    assert attempts.cancelled == 2


async def test_a_failed_attempt_is_replaced_at_once_and_its_error_kept() -> None:
    attempts = Script(fails, fails, passes)

    result, report = await attempt_step(plan(parallel=1), attempts)

    assert result == "done"
    assert report.attempts == 3
    assert [(error.attempt, error.error) for error in report.errors] == [
        (1, "RuntimeError: Forced failure for testing"),
        (2, "RuntimeError: Forced failure for testing"),
    ]


async def test_a_hung_attempt_is_cut_at_its_timeout() -> None:
    attempts = Script(hangs, passes)

    _, report = await attempt_step(plan(parallel=1, attempt_timeout_seconds=0.05), attempts)

    assert [error.error for error in report.errors] == ["attempt timed out"]
    assert attempts.cancelled == 1


async def test_a_non_retryable_error_fails_the_step_at_once_with_its_type() -> None:
    attempts = Script(fails, invalid("OrderInvalid"), hangs)

    with pytest.raises(ApplicationError) as failed:
        await attempt_step(plan(parallel=1), attempts)

    assert (failed.value.type, failed.value.message, failed.value.non_retryable) == (
        "OrderInvalid",
        "order broken",
        True,
    )
    assert reported(failed.value).attempts == 2
    assert attempts.started == 2


async def test_the_step_gives_up_after_max_attempts() -> None:
    attempts = Script(fails)

    with pytest.raises(ApplicationError) as exhausted:
        await attempt_step(plan(parallel=2, max_attempts=5), attempts)

    assert exhausted.value.type == STEP_EXHAUSTED
    assert exhausted.value.non_retryable
    assert exhausted.value.message == (
        "charge_payment failed 5 times; last error: RuntimeError: Forced failure for testing"
    )
    assert attempts.started == 5
    assert reported(exhausted.value).attempts == 5


async def test_no_attempt_starts_after_the_deadline() -> None:
    attempts = Script(hangs)

    with pytest.raises(ApplicationError) as late:
        await attempt_step(plan(parallel=2, attempt_timeout_seconds=0.05, time_left_seconds=0.2), attempts)

    assert late.value.type == DEADLINE_EXCEEDED
    assert late.value.message == "deadline_exceeded: step charge_payment still running after 14 s"
    report = reported(late.value)
    assert 2 <= report.attempts <= 10
    assert {error.error for error in report.errors} == {"attempt timed out"}


async def test_a_database_outage_spends_no_attempts_and_backs_off() -> None:
    attempts = Script(database_down, database_down, database_down, passes)
    loop = asyncio.get_running_loop()
    began = loop.time()

    result, report = await attempt_step(plan(parallel=1, max_attempts=1), attempts)

    # three outages waited 0.2 + 0.4 + 0.8 s, and the one attempt allowed then passed
    assert result == "done"
    assert report.attempts == 4
    assert loop.time() - began >= 1.4


async def test_the_report_keeps_the_latest_errors_only() -> None:
    attempts = Script(*[fails] * (RECENT_ERRORS + 5), passes)

    _, report = await attempt_step(plan(parallel=1), attempts)

    assert report.attempts == RECENT_ERRORS + 6
    assert [error.attempt for error in report.errors] == list(range(6, RECENT_ERRORS + 6))


async def test_cancelling_the_step_cancels_its_attempts() -> None:
    attempts = Script(hangs)
    step = asyncio.create_task(attempt_step(plan(attempt_timeout_seconds=10.0), attempts))
    await asyncio.sleep(0.05)
    assert attempts.started == 3

    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step

    await asyncio.sleep(0.01)
    assert attempts.cancelled == 3


def test_an_order_s_log_adds_up_each_step_s_attempts_and_keeps_its_latest_errors() -> None:
    log = AttemptLog("o-1")
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def errors(step: Step, first: int, count: int) -> list[StepError]:
        return [
            StepError(step=step, attempt=n, error="boom", at=start + timedelta(seconds=n))
            for n in range(first, first + count)
        ]

    log.merge(StepAttempts(step=Step.VALIDATE, attempts=3, errors=errors(Step.VALIDATE, 1, 2)))
    log.merge(StepAttempts(step=Step.CHARGE_PAYMENT, attempts=4, errors=errors(Step.CHARGE_PAYMENT, 3, 3)))
    log.merge(StepAttempts(step=Step.VALIDATE, attempts=RECENT_ERRORS, errors=errors(Step.VALIDATE, 6, 6)))

    assert log.report(Step.VALIDATE).attempts == 3 + RECENT_ERRORS
    assert log.report(Step.CHARGE_PAYMENT).attempts == 4
    assert log.report(Step.RECEIVE) == StepAttempts(step=Step.RECEIVE, attempts=0)
    # the order keeps its latest errors of any step, and each step's report shows its own of them
    assert [error.attempt for error in log.errors] == list(range(12 - RECENT_ERRORS, 12))
    assert [error.attempt for error in log.report(Step.VALIDATE).errors] == [2, *range(6, 12)]
