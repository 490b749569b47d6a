"""OrderWorkflow and ShippingWorkflow, for real, against mocked activities.

The workflows run on Temporal's time-skipping test server with the production sandbox runner and
the pydantic data converter; every activity is a mock registered under its real name (see
`workflow_harness.py`). Time skips only while a test awaits the lifecycle's result and no
activity attempt is in flight: before that, a test steers the order in real time, polling the
events the `publish_events` mock received.

The last tests make messages arrive together (one worker is stopped meanwhile) to check the
address update against the ends of a shipment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from uuid import uuid4

import pytest_asyncio
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from workflow_harness import (
    ADDRESS,
    AMOUNT_CENTS,
    NEW_ADDRESS,
    TRACKING_NUMBER,
    OrderHarness,
    Role,
    cancel_after_payment_scenario,
    dispatch_retry_scenario,
    fails,
    hangs,
    happy_path_scenario,
    invalid,
    order_harness,
    own_time_skipping_env,
    waits_for,
)

from services.workers.steps import Activities, ChargeRequest, DispatchRequest
from shared.contracts import Address, EventType, OrderEvent, OrderState, Step

E = EventType
HAPPY_EVENTS = [
    E.RECEIVED, E.VALIDATED, E.AWAITING_APPROVAL, E.APPROVED, E.PAYMENT_CHARGED,
    E.SHIPPING_STARTED, E.PACKAGE_PREPARED, E.CARRIER_DISPATCHED, E.SHIPPED, E.COMPLETED,
]  # fmt: skip
UNTIL_REVIEW = [E.RECEIVED, E.VALIDATED, E.AWAITING_APPROVAL]
UNTIL_SHIPPING = [*UNTIL_REVIEW, E.APPROVED, E.PAYMENT_CHARGED, E.SHIPPING_STARTED]


@pytest_asyncio.fixture
async def harness(time_skipping_env: WorkflowEnvironment) -> AsyncIterator[OrderHarness]:
    async with order_harness(time_skipping_env.client) as harness:
        yield harness


@pytest_asyncio.fixture
async def harness_on_own_server() -> AsyncIterator[OrderHarness]:
    """For a test whose workflow ends while an activity attempt is still in flight.

    The time-skipping test server keeps time from skipping while an attempt is outstanding, and
    never lets go if the workflow closes first: on the shared server every later test would then
    wait out its timers in real time.
    """
    async with own_time_skipping_env() as env, order_harness(env.client) as harness:
        yield harness


@pytest_asyncio.fixture
async def stoppable_harness(time_skipping_env: WorkflowEnvironment) -> AsyncIterator[OrderHarness]:
    """A harness whose workers a test can stop and start again (no sticky workflow cache)."""
    async with order_harness(time_skipping_env.client, sticky=False) as harness:
        yield harness


@pytest_asyncio.fixture
async def harness_on_dev_server(temporal_dev_server: WorkflowEnvironment) -> AsyncIterator[OrderHarness]:
    """For parallel attempts: the test server cannot take a cancel of an attempt whose completion
    is already on its way (the real server can), and parallel attempts cancel their losers."""
    async with order_harness(temporal_dev_server.client) as harness:
        yield harness


# --- assertions shared by the tests ---------------------------------------------------------------
def assert_numbered(harness: OrderHarness) -> list[OrderEvent]:
    """The published events: this order's, each once, numbered 1..n without gaps, one terminal last."""
    events = harness.mocks.events
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    assert len({event.event_id for event in events}) == len(events)
    assert {event.order_id for event in events} == {harness.order_id}
    assert {event.correlation_id for event in events} == {harness.order.correlation_id}
    assert [event.type.is_terminal for event in events].count(True) == 1
    assert events[-1].type.is_terminal
    return events


def assert_not_called(harness: OrderHarness, *names: str) -> None:
    for name in names:
        assert harness.mocks.called(name) == [], f"{name} should not have been called"


# --- the lifecycle's paths ------------------------------------------------------------------------
async def test_approved_order_completes_with_every_step_and_event(harness: OrderHarness) -> None:
    status, approval = await happy_path_scenario(harness)

    assert status.state is OrderState.COMPLETED
    assert status.step is Step.DONE
    assert (status.tracking_number, status.shipping_attempts, status.refunded) == (TRACKING_NUMBER, 1, False)
    assert status.reason is None and status.finished_at is not None
    business_steps = [
        Step.RECEIVE, Step.VALIDATE, Step.CHARGE_PAYMENT,
        Step.PREPARE_PACKAGE, Step.DISPATCH_CARRIER, Step.MARK_SHIPPED,
    ]  # fmt: skip
    assert status.attempts == dict.fromkeys(business_steps, 1)
    assert status.recent_errors == []
    assert await harness.status() == status

    calls = harness.mocks.calls
    order, order_id = harness.order, harness.order_id
    assert calls[Activities.RECEIVE_ORDER] == [order]
    assert calls[Activities.VALIDATE_ORDER] == [order_id]
    assert calls[Activities.CHARGE_PAYMENT] == [
        ChargeRequest(order_id=order_id, payment_id=order.payload.payment_id, amount_cents=AMOUNT_CENTS)
    ]
    assert calls[Activities.PREPARE_PACKAGE] == [order_id]
    assert calls[Activities.DISPATCH_CARRIER] == [DispatchRequest(order_id=order_id, address=ADDRESS)]
    assert calls[Activities.MARK_SHIPPED] == [order_id]
    assert_not_called(harness, Activities.REFUND_PAYMENT)

    events = assert_numbered(harness)
    assert [event.type for event in events] == HAPPY_EVENTS
    by_type = {event.type: event for event in events}
    assert by_type[E.APPROVED].command_id == approval.command_id
    assert by_type[E.APPROVED].data == {"reviewer": "reviewer-1", "note": "looks fine"}
    assert by_type[E.PAYMENT_CHARGED].data == {"amount_cents": AMOUNT_CENTS, "already_charged": False}
    assert by_type[E.SHIPPING_STARTED].data == {"shipping_attempt": 1}
    dispatched = by_type[E.CARRIER_DISPATCHED]
    assert dispatched.data == {"tracking_number": TRACKING_NUMBER, "address": ADDRESS.model_dump()}
    assert by_type[E.SHIPPED].data == {"tracking_number": TRACKING_NUMBER}
    assert by_type[E.AWAITING_APPROVAL].data == {"review_window_seconds": harness.policy.review_window_seconds}
    assert all(event.command_id is None for event in events if event.type is not E.APPROVED)
    assert await harness.shipment_status(1) is WorkflowExecutionStatus.COMPLETED


async def test_cancel_before_approval_ends_without_charging(harness: OrderHarness) -> None:
    await harness.start()
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    cancel = await harness.cancel(reason="found it cheaper")
    status = await harness.result()

    assert (status.state, status.reason, status.refunded) == (OrderState.CANCELLED, "found it cheaper", False)
    assert_not_called(harness, Activities.CHARGE_PAYMENT, Activities.REFUND_PAYMENT, Activities.PREPARE_PACKAGE)
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_REVIEW, E.CANCELLED]
    assert events[-1].command_id == cancel.command_id
    assert events[-1].data == {"reason": "found it cheaper", "refunded": False}


async def test_cancel_after_payment_refunds_and_stops_the_shipment(harness_on_own_server: OrderHarness) -> None:
    harness = harness_on_own_server
    status, cancel = await cancel_after_payment_scenario(harness)

    assert (status.state, status.reason, status.refunded) == (OrderState.CANCELLED, cancel.payload.reason, True)
    assert harness.mocks.called(Activities.REFUND_PAYMENT) == [harness.order.payload.payment_id]
    assert await harness.shipment_status(1) is WorkflowExecutionStatus.CANCELED
    assert_not_called(harness, Activities.MARK_SHIPPED)
    events = assert_numbered(harness)
    events_after_cancel = [event.type.value for event in events[len(UNTIL_SHIPPING) + 1 : -1]]
    # A cancel ends the lifecycle where it is: the cancelled shipment is not retried.
    assert events_after_cancel == [], f"the cancelled shipment was retried: {events_after_cancel}"
    assert await harness.shipment_status(2) is None
    assert status.shipping_attempts == 1
    assert [event.type for event in events] == [*UNTIL_SHIPPING, E.PACKAGE_PREPARED, E.CANCELLED]
    assert events[-1].command_id == cancel.command_id
    assert events[-1].data == {"reason": cancel.payload.reason, "refunded": True}


async def test_address_update_before_dispatch_reaches_the_running_shipment(harness: OrderHarness) -> None:
    # The package is held back, so the update arrives while the shipment runs and before dispatch.
    gate = asyncio.Event()
    harness.mocks.script(Activities.PREPARE_PACKAGE, then=waits_for(gate))
    await harness.start()
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    await harness.approve()
    await harness.wait_for_call(Activities.PREPARE_PACKAGE)
    update = await harness.update_address(NEW_ADDRESS)
    updated = await harness.wait_for_event(E.ADDRESS_UPDATED)
    assert (await harness.status()).address == NEW_ADDRESS
    gate.set()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert status.address == NEW_ADDRESS
    dispatched_to = [request.address for request in harness.mocks.called(Activities.DISPATCH_CARRIER)]
    assert dispatched_to == [NEW_ADDRESS]
    assert updated.command_id == update.command_id
    assert updated.data == {"address": NEW_ADDRESS.model_dump()}
    events = assert_numbered(harness)
    assert [event.type for event in events] == [
        *UNTIL_SHIPPING, E.ADDRESS_UPDATED, E.PACKAGE_PREPARED, E.CARRIER_DISPATCHED, E.SHIPPED, E.COMPLETED
    ]
    assert harness.mocks.events_of(E.CARRIER_DISPATCHED)[0].data["address"] == NEW_ADDRESS.model_dump()


async def test_address_update_after_dispatch_is_rejected(harness: OrderHarness) -> None:
    # Marking shipped is held back, so the order is dispatched but still running.
    gate = asyncio.Event()
    harness.mocks.script(Activities.MARK_SHIPPED, then=waits_for(gate))
    await harness.start()
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    await harness.approve()
    await harness.wait_for_event(E.CARRIER_DISPATCHED)
    update = await harness.update_address(NEW_ADDRESS)
    rejected = await harness.wait_for_event(E.COMMAND_REJECTED)
    gate.set()
    status = await harness.result()

    assert rejected.command_id == update.command_id
    assert rejected.data == {"command_type": "UpdateAddress", "reason": "order already dispatched"}
    assert status.state is OrderState.COMPLETED
    assert status.address == ADDRESS
    assert [request.address for request in harness.mocks.called(Activities.DISPATCH_CARRIER)] == [ADDRESS]
    events = assert_numbered(harness)
    assert E.ADDRESS_UPDATED not in [event.type for event in events]


async def test_review_window_expiry_cancels_the_order(harness: OrderHarness) -> None:
    await harness.start()
    status = await harness.result()

    assert (status.state, status.reason, status.refunded) == (OrderState.CANCELLED, "review_timeout", False)
    assert status.finished_at is not None
    assert status.finished_at - status.started_at >= timedelta(seconds=harness.policy.review_window_seconds)
    assert_not_called(harness, Activities.CHARGE_PAYMENT, Activities.REFUND_PAYMENT)
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_REVIEW, E.CANCELLED]
    assert events[-1].command_id is None
    assert events[-1].data == {"reason": "review_timeout", "refunded": False}


async def test_dispatch_failure_makes_the_parent_ship_again(harness: OrderHarness) -> None:
    status = await dispatch_retry_scenario(harness)
    per_shipment = harness.policy.dispatch_attempts_per_shipment

    assert status.state is OrderState.COMPLETED
    assert status.shipping_attempts == 2
    assert status.tracking_number == TRACKING_NUMBER
    assert status.attempts[Step.DISPATCH_CARRIER] == per_shipment + 1
    assert [error.step for error in status.recent_errors] == [Step.DISPATCH_CARRIER] * per_shipment
    # the package was prepared once; the second shipment only dispatches
    assert len(harness.mocks.called(Activities.PREPARE_PACKAGE)) == 1
    assert len(harness.mocks.called(Activities.DISPATCH_CARRIER)) == per_shipment + 1
    events = assert_numbered(harness)
    assert [event.type for event in events] == [
        *UNTIL_SHIPPING, E.PACKAGE_PREPARED, E.DISPATCH_FAILED,
        E.SHIPPING_STARTED, E.CARRIER_DISPATCHED, E.SHIPPED, E.COMPLETED,
    ]  # fmt: skip
    assert [event.data for event in harness.mocks.events_of(E.SHIPPING_STARTED)] == [
        {"shipping_attempt": 1},
        {"shipping_attempt": 2},
    ]
    failed = harness.mocks.events_of(E.DISPATCH_FAILED)[0]
    assert failed.data["shipping_attempt"] == 1
    assert f"carrier refused #{per_shipment}" in failed.data["reason"]
    assert await harness.shipment_status(1) is WorkflowExecutionStatus.COMPLETED
    assert await harness.shipment_status(2) is WorkflowExecutionStatus.COMPLETED


async def test_dispatch_failing_every_time_fails_the_order_and_refunds(harness: OrderHarness) -> None:
    harness.mocks.script(Activities.DISPATCH_CARRIER, then=fails("carrier down"))
    await harness.start(max_shipping_attempts=2)
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    await harness.approve()
    status = await harness.result()

    assert status.state is OrderState.FAILED
    assert status.reason is not None and "dispatch" in status.reason and "carrier down" in status.reason
    assert status.refunded is True
    assert status.shipping_attempts == 2
    assert harness.mocks.called(Activities.REFUND_PAYMENT) == [harness.order.payload.payment_id]
    per_shipment = harness.policy.dispatch_attempts_per_shipment
    assert len(harness.mocks.called(Activities.DISPATCH_CARRIER)) == 2 * per_shipment
    assert_not_called(harness, Activities.MARK_SHIPPED)
    events = assert_numbered(harness)
    assert [event.type for event in events].count(E.DISPATCH_FAILED) == 2
    assert events[-1].type is E.FAILED
    assert events[-1].data == {"reason": status.reason, "refunded": True}


async def test_duplicate_commands_apply_once(harness: OrderHarness) -> None:
    # Charging is held back so every signal lands while the order is still waiting to ship.
    gate = asyncio.Event()
    harness.mocks.script(Activities.CHARGE_PAYMENT, then=waits_for(gate))
    await harness.start()
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    update_id, approve_id = uuid4(), uuid4()
    await harness.update_address(NEW_ADDRESS, command_id=update_id)
    await harness.update_address(NEW_ADDRESS, command_id=update_id)
    await harness.approve(command_id=approve_id)
    await harness.approve(command_id=approve_id)
    await harness.wait_for_event(E.APPROVED)
    # a different approval is a new command, and is rejected; signals are handled in order, so
    # once it is rejected the duplicates before it have been handled too
    other = await harness.approve()
    rejected = await harness.wait_for_event(E.COMMAND_REJECTED)
    gate.set()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    events = assert_numbered(harness)
    assert [(event.type, event.command_id) for event in events if event.command_id is not None] == [
        (E.ADDRESS_UPDATED, update_id),
        (E.APPROVED, approve_id),
        (E.COMMAND_REJECTED, other.command_id),
    ]
    assert rejected.data == {"command_type": "ApproveOrder", "reason": "order already approved"}
    assert [request.address for request in harness.mocks.called(Activities.DISPATCH_CARRIER)] == [NEW_ADDRESS]


async def test_invalid_order_fails_without_charging(harness: OrderHarness) -> None:
    harness.mocks.script(Activities.VALIDATE_ORDER, invalid("each SKU may appear once; repeated: SKU-1"))
    await harness.start()
    status = await harness.result()

    assert status.state is OrderState.FAILED
    assert status.reason == "invalid order: each SKU may appear once; repeated: SKU-1"
    assert status.refunded is False
    assert status.attempts[Step.VALIDATE] == 1, "a business-rule violation is not retried"
    assert_not_called(harness, Activities.CHARGE_PAYMENT, Activities.REFUND_PAYMENT)
    events = assert_numbered(harness)
    assert [event.type for event in events] == [E.RECEIVED, E.FAILED]
    assert events[-1].data == {"reason": status.reason, "refunded": False}


async def test_status_counts_attempts_and_keeps_their_errors(harness: OrderHarness) -> None:
    harness.mocks.script(Activities.RECEIVE_ORDER, fails("database away #1"), fails("database away #2"))
    await harness.start()
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    status = await harness.status()

    assert status.attempts[Step.RECEIVE] == 3
    errors = [(error.step, error.attempt, error.error) for error in status.recent_errors]
    assert errors == [(Step.RECEIVE, 1, "database away #1"), (Step.RECEIVE, 2, "database away #2")]
    assert len(harness.mocks.called(Activities.RECEIVE_ORDER)) == 3
    await harness.approve()
    assert (await harness.result()).attempts[Step.RECEIVE] == 3


async def test_parallel_attempts_do_not_wait_out_a_hang(harness_on_dev_server: OrderHarness) -> None:
    # With two attempts in flight, a hung first attempt does not hold the step up.
    harness = harness_on_dev_server
    harness.mocks.script(Activities.RECEIVE_ORDER, hangs)
    await harness.start(parallel_attempts=2, activity_attempt_timeout_seconds=5.0)
    await harness.wait_for_event(E.RECEIVED, timeout=2.0)
    status = await harness.status()

    assert status.attempts[Step.RECEIVE] == 2
    assert status.recent_errors == []
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    await harness.approve()
    assert (await harness.result()).state is OrderState.COMPLETED


async def test_deadline_ends_an_order_whose_step_never_succeeds(harness_on_own_server: OrderHarness) -> None:
    # Every attempt hangs until its timeout cuts it. The test server does not skip time while an
    # attempt is in flight, so this deadline passes in real time: keep it short.
    harness = harness_on_own_server
    harness.mocks.script(Activities.RECEIVE_ORDER, then=hangs)
    await harness.start(lifecycle_deadline_seconds=2.0, review_window_seconds=1.0)
    status = await harness.result()

    assert (status.state, status.reason, status.refunded) == (OrderState.FAILED, "deadline_exceeded", False)
    started = (await harness.handle.describe()).start_time
    assert status.finished_at is not None
    assert timedelta(seconds=2) <= status.finished_at - started <= timedelta(seconds=2.5)
    assert status.attempts[Step.RECEIVE] > 1
    assert all(error.error == "attempt timed out" for error in status.recent_errors)
    assert_not_called(harness, Activities.VALIDATE_ORDER, Activities.CHARGE_PAYMENT, Activities.REFUND_PAYMENT)
    events = assert_numbered(harness)
    assert [event.type for event in events] == [E.FAILED]
    assert events[-1].data == {"reason": "deadline_exceeded", "refunded": False}


# --- an address update racing the shipment --------------------------------------------------------
async def test_address_update_as_a_failed_shipment_ends_goes_to_the_next_shipment(
    stoppable_harness: OrderHarness,
) -> None:
    # The update must land in the same workflow task as the end of a failed shipment: the order
    # worker is away while the first shipment reports DispatchFailed and completes and the update
    # arrives. Signals are handled before the child's result, so the update still sees the first
    # shipment as running and forwards the new address to it.
    harness = stoppable_harness
    gate = asyncio.Event()
    refused = fails("carrier refused")
    harness.mocks.script(Activities.DISPATCH_CARRIER, waits_for(gate, then=refused), refused)
    await harness.start()
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    await harness.approve()
    await harness.wait_for_call(Activities.DISPATCH_CARRIER)
    async with harness.worker_stopped(Role.ORDERS):
        gate.set()
        await harness.wait_for_shipment(1, WorkflowExecutionStatus.COMPLETED)
        update = await harness.update_address(NEW_ADDRESS)
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert status.address == NEW_ADDRESS
    dispatched_to = [request.address for request in harness.mocks.called(Activities.DISPATCH_CARRIER)]
    assert dispatched_to == [ADDRESS, ADDRESS, NEW_ADDRESS]
    assert harness.mocks.events_of(E.ADDRESS_UPDATED)[0].command_id == update.command_id
    events = assert_numbered(harness)
    assert [event.type for event in events][-5:] == [
        E.ADDRESS_UPDATED, E.SHIPPING_STARTED, E.CARRIER_DISPATCHED, E.SHIPPED, E.COMPLETED
    ]


async def test_address_update_as_dispatch_completes_reaches_the_carrier(
    stoppable_harness: OrderHarness,
) -> None:
    # The update must reach the shipment in the same workflow task as its dispatch result: the
    # shipments' workflow worker is away while the dispatch to the old address completes and the
    # update is forwarded. Signals are handled before results, so the shipment sees both at once.
    harness = stoppable_harness
    gate = asyncio.Event()
    harness.mocks.script(Activities.DISPATCH_CARRIER, waits_for(gate))
    await harness.start()
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    await harness.approve()
    await harness.wait_for_call(Activities.DISPATCH_CARRIER)
    async with harness.worker_stopped(Role.SHIPMENTS):
        gate.set()
        await harness.update_address(NEW_ADDRESS)
        await harness.wait_for_shipment_history(
            1,
            HistoryEventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
            HistoryEventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
        )
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert status.address == NEW_ADDRESS
    dispatched = harness.mocks.events_of(E.CARRIER_DISPATCHED)[0]
    dispatched_to = [request.address for request in harness.mocks.called(Activities.DISPATCH_CARRIER)]
    # the update was accepted (address_updated), so the carrier must end up with the new address
    assert E.ADDRESS_UPDATED in harness.mocks.event_types()
    assert dispatched_to[-1] == NEW_ADDRESS, (
        f"the carrier was last given {dispatched_to[-1].line1!r}, the order says {status.address.line1!r}"
    )
    assert dispatched.data["address"] == NEW_ADDRESS.model_dump()


async def test_address_update_overtaken_by_the_dispatch_report_is_not_claimed(
    stoppable_harness: OrderHarness,
) -> None:
    # The shipment has dispatched to the old address and its CarrierDispatched report is on its
    # way, but the order has not seen it when the update arrives: both workflow workers are away
    # while the dispatch completes and the update is sent; the shipment then reports, and only
    # then does the order handle the update and the report, in that order.
    harness = stoppable_harness
    gate = asyncio.Event()
    harness.mocks.script(Activities.DISPATCH_CARRIER, waits_for(gate))
    await harness.start()
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    await harness.approve()
    await harness.wait_for_call(Activities.DISPATCH_CARRIER)
    async with harness.worker_stopped(Role.ORDERS):
        async with harness.worker_stopped(Role.SHIPMENTS):
            gate.set()
            await harness.wait_for_shipment_history(1, HistoryEventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
            await harness.update_address(NEW_ADDRESS)
        await harness.wait_for_shipment(1, WorkflowExecutionStatus.COMPLETED)
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    dispatched_to = [request.address for request in harness.mocks.called(Activities.DISPATCH_CARRIER)]
    reported = Address.model_validate(harness.mocks.events_of(E.CARRIER_DISPATCHED)[-1].data["address"])
    # whatever the order decides about the late update, what it reports must be what the carrier got
    assert reported == dispatched_to[-1], (
        f"carrier_dispatched reports {reported.line1!r} but the carrier was given {dispatched_to[-1].line1!r}"
    )
    assert status.address == dispatched_to[-1], (
        f"the order's address is {status.address.line1!r} but the carrier was given {dispatched_to[-1].line1!r}"
    )
