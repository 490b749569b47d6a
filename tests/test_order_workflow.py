"""OrderWorkflow and ShippingWorkflow, for real, against mocked activities.

The workflows run on Temporal's time-skipping test server with the production sandbox runner and
the pydantic data converter; every activity is a mock registered under its real name (see
`workflow_harness.py`). Time skips only while a test awaits the lifecycle's result and no
workflow task is open (a step's attempts are local activities: its task stays open while they
run): before that, a test steers the order in real time, polling the events the
`publish_events` mock received.

The last tests make messages arrive together with the ends of a shipment, to check the address
update against them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.converter import decode_typed_search_attributes
from temporalio.exceptions import CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from services.workers.activity_interface import DispatchCarrierInput, OrderActivities, PaymentInput
from services.workers.admission_slot import SLOT_RECHECK
from services.workers.order_workflow import CANCELLED_THROUGH_TEMPORAL, OrderWorkflow
from services.workers.shipping_workflow import ShippingWorkflow
from services.workers.visibility import AWAITING_REVIEW, ORDER_AMOUNT, ORDER_STATE
from services.workers.worker import require_search_attributes, sandbox_runner
from shared.authorization import FORBIDDEN
from shared.contracts import (
    Address,
    CommandType,
    EventType,
    OrderEvent,
    OrderState,
    OrderStatus,
    Step,
)
from shared.lifecycle import EVENTS_QUERY, Signals
from workflow_harness import (
    ADDRESS,
    AMOUNT_CENTS,
    CUSTOMER,
    CUSTOMER_WHO_REVIEWS,
    LIFECYCLE_BOUND,
    NEW_ADDRESS,
    OPERATOR,
    OTHER_CUSTOMER,
    PRODUCTION_ATTEMPTS,
    REVIEWER,
    TRACKING_NUMBER,
    Mocked,
    OrderHarness,
    Role,
    cancel_after_payment_scenario,
    database_down,
    dispatch_retry_scenario,
    early_commands_scenario,
    fails,
    flaky,
    hangs,
    happy_path_scenario,
    invalid,
    order_harness,
    own_time_skipping_env,
    passes,
    wait_until,
    waits_for,
)

E = EventType
HAPPY_EVENTS = [
    E.ADMITTED, E.RECEIVED, E.VALIDATED, E.AWAITING_APPROVAL, E.APPROVED, E.PAYMENT_CHARGED,
    E.SHIPPING_STARTED, E.PACKAGE_PREPARED, E.CARRIER_DISPATCHED, E.SHIPPED, E.COMPLETED,
]  # fmt: skip
UNTIL_REVIEW = [E.ADMITTED, E.RECEIVED, E.VALIDATED, E.AWAITING_APPROVAL]
UNTIL_SHIPPING = [*UNTIL_REVIEW, E.APPROVED, E.PAYMENT_CHARGED, E.SHIPPING_STARTED]
METADATA_QUERY = "__temporal_workflow_metadata"  # Temporal's built-in query behind the UI's details


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
    """On a real server: production's attempts against mocks that fail, hang or pass like the
    contract's fault injector. Without a workflow cache: every workflow task replays the history
    so far, so a replay that disagrees with the first run fails the lifecycle as it goes."""
    async with order_harness(
        temporal_dev_server.client, unscripted=flaky(seed=7), policy=PRODUCTION_ATTEMPTS, sticky=False
    ) as harness:
        yield harness


# --- assertions shared by the tests ---------------------------------------------------------------
def assert_numbered(harness: OrderHarness, first_seq: int = 1) -> list[OrderEvent]:
    """The published events (each id once, always with the same content: delivery is at least
    once): this order's, numbered from `first_seq` without gaps, one terminal, followed by nothing
    but rejections of commands that came too late."""
    events = harness.mocks.events
    assert harness.mocks.conflicting == []
    assert [event.seq for event in events] == list(range(first_seq, first_seq + len(events)))
    assert len({event.event_id for event in events}) == len(events)
    assert {event.order_id for event in events} == {harness.order_id}
    assert {event.correlation_id for event in events} == {harness.order.correlation_id}
    terminal = [index for index, event in enumerate(events) if event.type.is_terminal]
    assert len(terminal) == 1
    assert {event.type for event in events[terminal[0] + 1 :]} <= {E.COMMAND_REJECTED}
    return events


async def activities_scheduled(harness: OrderHarness) -> int:
    """How many regular activities the order's history scheduled: its batches sent so."""
    history = await harness.handle.fetch_history()
    return sum(1 for event in history.events if event.HasField("activity_task_scheduled_event_attributes"))


def assert_not_called(harness: OrderHarness, *mocked: Mocked) -> None:
    for activity in mocked:
        assert harness.mocks.called(activity) == [], f"{activity.__name__} should not have been called"


async def current_details(harness: OrderHarness) -> str:
    """What Temporal's UI shows as the workflow's current details (its metadata query)."""
    metadata: WorkflowMetadata = await harness.handle.query(METADATA_QUERY, result_type=WorkflowMetadata)
    return metadata.current_details


async def approved_and_held_in(harness: OrderHarness, step: Mocked) -> asyncio.Event:
    """Start and approve the order, and wait until `step` is called and held: set the gate to go on."""
    gate = asyncio.Event()
    harness.mocks.script(step, then=waits_for(gate))
    await harness.start_and_approve()
    await harness.wait_for_call(step)
    return gate


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

    called = harness.mocks.called
    order, order_id = harness.order, harness.order_id
    assert called(OrderActivities.receive_order) == [order]
    assert called(OrderActivities.validate_order) == [order_id]
    assert called(OrderActivities.charge_payment) == [
        PaymentInput(order_id=order_id, payment_id=order.payload.payment_id, amount_cents=AMOUNT_CENTS)
    ]
    assert called(OrderActivities.prepare_package) == [order_id]
    assert called(OrderActivities.dispatch_carrier) == [
        DispatchCarrierInput(order_id=order_id, address=ADDRESS)
    ]
    assert called(OrderActivities.mark_shipped) == [order_id]
    assert called(OrderActivities.release_admission) == [order_id]
    assert_not_called(harness, OrderActivities.refund_payment)

    events = assert_numbered(harness)
    assert [event.type for event in events] == HAPPY_EVENTS
    by_type = {event.type: event for event in events}
    assert by_type[E.APPROVED].command_id == approval.command_id
    assert by_type[E.APPROVED].data.model_dump(mode="json") == {
        "approved_by": REVIEWER.subject,
        "note": "looks fine",
    }
    assert by_type[E.RECEIVED].data.model_dump(mode="json") == {"placed_by": CUSTOMER.subject}
    assert (status.placed_by, status.approved_by) == (CUSTOMER.subject, REVIEWER.subject)
    assert by_type[E.PAYMENT_CHARGED].data.model_dump(mode="json") == {
        "amount_cents": AMOUNT_CENTS,
        "already_charged": False,
    }
    assert by_type[E.SHIPPING_STARTED].data.model_dump(mode="json") == {"shipping_attempt": 1}
    dispatched = by_type[E.CARRIER_DISPATCHED]
    assert dispatched.data.model_dump(mode="json") == {
        "tracking_number": TRACKING_NUMBER,
        "address": ADDRESS.model_dump(),
    }
    assert by_type[E.SHIPPED].data.model_dump(mode="json") == {"tracking_number": TRACKING_NUMBER}
    assert by_type[E.AWAITING_APPROVAL].data.model_dump(mode="json") == {
        "review_window_seconds": harness.policy.review_window_seconds
    }
    assert all(event.command_id is None for event in events if event.type is not E.APPROVED)
    assert await harness.shipment_status(1) is WorkflowExecutionStatus.COMPLETED


async def test_cancel_before_approval_ends_without_charging(harness: OrderHarness) -> None:
    await harness.start_in_review()
    cancel = await harness.cancel(reason="found it cheaper")
    status = await harness.result()

    assert (status.state, status.reason, status.refunded) == (OrderState.CANCELLED, "found it cheaper", False)
    assert_not_called(
        harness,
        OrderActivities.charge_payment,
        OrderActivities.refund_payment,
        OrderActivities.prepare_package,
    )
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_REVIEW, E.CANCELLED]
    assert events[-1].command_id == cancel.command_id
    assert events[-1].data.model_dump(mode="json") == {"reason": "found it cheaper", "refunded": False}


async def test_cancel_after_payment_refunds_and_stops_the_shipment(
    harness_on_own_server: OrderHarness,
) -> None:
    harness = harness_on_own_server
    status, cancel = await cancel_after_payment_scenario(harness)

    assert (status.state, status.reason, status.refunded) == (
        OrderState.CANCELLED,
        cancel.payload.reason,
        True,
    )
    assert harness.mocks.called(OrderActivities.refund_payment) == [harness.payment]
    assert await harness.shipment_status(1) is WorkflowExecutionStatus.CANCELED
    assert_not_called(harness, OrderActivities.mark_shipped)
    events = assert_numbered(harness)
    events_after_cancel = [event.type.value for event in events[len(UNTIL_SHIPPING) + 1 : -1]]
    # A cancel ends the lifecycle where it is: the cancelled shipment is not retried.
    assert events_after_cancel == [], f"the cancelled shipment was retried: {events_after_cancel}"
    assert await harness.shipment_status(2) is None
    assert status.shipping_attempts == 1
    assert [event.type for event in events] == [*UNTIL_SHIPPING, E.PACKAGE_PREPARED, E.CANCELLED]
    assert events[-1].command_id == cancel.command_id
    assert events[-1].data.model_dump(mode="json") == {"reason": cancel.payload.reason, "refunded": True}


async def cancelled_through_temporal(harness: OrderHarness) -> OrderStatus:
    """Cancel the workflow as an operator would (CLI, UI, SDK); it must close as Canceled."""
    await harness.handle.cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(harness.handle.result(), LIFECYCLE_BOUND)
    assert isinstance(failure.value.cause, CancelledError)
    return await harness.status()


async def test_a_cancellation_through_temporal_in_review_ends_the_order_as_cancelled(
    harness: OrderHarness,
) -> None:
    await harness.start_in_review()
    status = await cancelled_through_temporal(harness)

    assert (status.state, status.reason, status.refunded) == (
        OrderState.CANCELLED, CANCELLED_THROUGH_TEMPORAL, False,
    )  # fmt: skip
    assert_not_called(harness, OrderActivities.charge_payment, OrderActivities.refund_payment)
    assert harness.mocks.called(OrderActivities.release_admission) != []
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_REVIEW, E.CANCELLED]
    assert events[-1].command_id is None
    assert events[-1].data.model_dump(mode="json") == {
        "reason": CANCELLED_THROUGH_TEMPORAL,
        "refunded": False,
    }


async def test_a_cancellation_through_temporal_after_payment_refunds_and_stops_the_shipment(
    harness_on_own_server: OrderHarness,
) -> None:
    harness = harness_on_own_server
    harness.mocks.script(OrderActivities.dispatch_carrier, then=hangs)
    await harness.start_and_approve(dispatch_attempts_per_shipment=20)
    await harness.wait_for_call(OrderActivities.dispatch_carrier)
    status = await cancelled_through_temporal(harness)

    assert (status.state, status.reason, status.refunded) == (
        OrderState.CANCELLED,
        CANCELLED_THROUGH_TEMPORAL,
        True,
    )
    assert len(harness.mocks.called(OrderActivities.refund_payment)) == 1
    assert await harness.shipment_status(1) is WorkflowExecutionStatus.CANCELED
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_SHIPPING, E.PACKAGE_PREPARED, E.CANCELLED]
    assert events[-1].data.model_dump(mode="json") == {"reason": CANCELLED_THROUGH_TEMPORAL, "refunded": True}


async def test_a_cancel_during_a_charge_attempt_refunds_whatever_the_attempt_did(
    harness_on_own_server: OrderHarness,
) -> None:
    # the charge attempt is in flight when the cancel lands: it may yet commit, so the order
    # refunds (the business layer voids a payment nothing charged yet)
    harness = harness_on_own_server
    gate = await approved_and_held_in(harness, OrderActivities.charge_payment)
    await harness.cancel(reason="changed my mind mid-charge")
    status = await harness.result()
    gate.set()

    assert (status.state, status.refunded) == (OrderState.CANCELLED, True)
    assert len(harness.mocks.called(OrderActivities.refund_payment)) == 1
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_REVIEW, E.APPROVED, E.CANCELLED]


async def test_the_events_query_returns_every_event_the_lifecycle_emitted(harness: OrderHarness) -> None:
    await happy_path_scenario(harness)

    emitted = await harness.handle.query(EVENTS_QUERY, result_type=list[OrderEvent])
    assert emitted == harness.mocks.events


async def test_a_cancel_delivered_twice_ends_the_order_once(harness: OrderHarness) -> None:
    await harness.start_in_review()
    cancel_id = uuid4()
    await harness.cancel(command_id=cancel_id)
    await harness.cancel(command_id=cancel_id)
    status = await harness.result()

    assert status.state is OrderState.CANCELLED
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_REVIEW, E.CANCELLED]  # the repeat: no rejection
    assert events[-1].command_id == cancel_id


async def test_an_approval_racing_a_cancel_loses_if_the_cancel_came_first(harness: OrderHarness) -> None:
    await harness.start_in_review()
    cancel = await harness.cancel()
    approval = await harness.approve()
    status = await harness.result()

    assert status.state is OrderState.CANCELLED
    assert_not_called(harness, OrderActivities.charge_payment, OrderActivities.refund_payment)
    events = assert_numbered(harness)
    # the approval is rejected, before or after the cancelled event depending on whether it
    # arrived while the order was ending or once it had ended
    assert sorted(event.type for event in events[len(UNTIL_REVIEW) :]) == [E.CANCELLED, E.COMMAND_REJECTED]
    [rejected] = [event for event in events if event.type is E.COMMAND_REJECTED]
    assert (rejected.command_id, rejected.data.model_dump(mode="json")["reason"]) == (
        approval.command_id,
        "order has ended or is ending",
    )
    [cancelled] = [event for event in events if event.type is E.CANCELLED]
    assert cancelled.command_id == cancel.command_id


async def test_a_cancel_racing_an_approval_still_cancels_and_leaves_nothing_charged(
    harness_on_own_server: OrderHarness,
) -> None:
    harness = harness_on_own_server
    approval = await harness.start_and_approve()
    cancel = await harness.cancel()
    status = await harness.result()

    assert status.state is OrderState.CANCELLED
    # however far the charge got before the cancel landed, whatever it did is undone
    charged = harness.mocks.called(OrderActivities.charge_payment) != []
    assert harness.mocks.called(OrderActivities.refund_payment) != [] if charged else True
    assert status.refunded is charged
    events = assert_numbered(harness)
    assert [event.type for event in events][: len(UNTIL_REVIEW) + 1] == [*UNTIL_REVIEW, E.APPROVED]
    assert E.COMMAND_REJECTED not in [event.type for event in events]
    assert (events[-1].type, events[-1].command_id) == (E.CANCELLED, cancel.command_id)
    assert events[len(UNTIL_REVIEW)].command_id == approval.command_id


async def test_address_update_before_dispatch_reaches_the_running_shipment(harness: OrderHarness) -> None:
    # The package is held back, so the update arrives while the shipment runs and before dispatch.
    gate = await approved_and_held_in(harness, OrderActivities.prepare_package)
    update = await harness.update_address(NEW_ADDRESS)
    updated = await harness.wait_for_event(E.ADDRESS_UPDATED)
    assert (await harness.status()).address == NEW_ADDRESS
    gate.set()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert status.address == NEW_ADDRESS
    dispatched_to = [request.address for request in harness.mocks.called(OrderActivities.dispatch_carrier)]
    assert dispatched_to == [NEW_ADDRESS]
    assert updated.command_id == update.command_id
    assert updated.data.model_dump(mode="json") == {"address": NEW_ADDRESS.model_dump()}
    events = assert_numbered(harness)
    assert [event.type for event in events] == [
        *UNTIL_SHIPPING,
        E.ADDRESS_UPDATED,
        E.PACKAGE_PREPARED,
        E.CARRIER_DISPATCHED,
        E.SHIPPED,
        E.COMPLETED,
    ]
    assert (
        harness.mocks.events_of(E.CARRIER_DISPATCHED)[0].data.model_dump(mode="json")["address"]
        == NEW_ADDRESS.model_dump()
    )


async def test_address_update_after_dispatch_is_rejected(harness: OrderHarness) -> None:
    # Marking shipped is held back, so the order is dispatched but still running.
    gate = await approved_and_held_in(harness, OrderActivities.mark_shipped)
    update = await harness.update_address(NEW_ADDRESS)
    rejected = await harness.wait_for_event(E.COMMAND_REJECTED)
    gate.set()
    status = await harness.result()

    assert rejected.command_id == update.command_id
    assert rejected.data.model_dump(mode="json") == {
        "command_type": "UpdateAddress",
        "reason": "order already dispatched",
    }
    assert status.state is OrderState.COMPLETED
    assert status.address == ADDRESS
    assert [request.address for request in harness.mocks.called(OrderActivities.dispatch_carrier)] == [
        ADDRESS
    ]
    events = assert_numbered(harness)
    assert E.ADDRESS_UPDATED not in [event.type for event in events]


async def test_the_reviewers_time_does_not_count_against_the_deadline(
    harness: OrderHarness, time_skipping_env: WorkflowEnvironment
) -> None:
    # the review takes three times the whole deadline; the work before and after it fits
    await harness.start_in_review(lifecycle_deadline_seconds=2.0, review_window_seconds=60.0)
    await time_skipping_env.sleep(6)
    await harness.approve()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert status.finished_at is not None
    assert status.finished_at - status.started_at >= timedelta(seconds=6)


async def test_review_window_expiry_cancels_the_order(harness: OrderHarness) -> None:
    await harness.start()
    status = await harness.result()

    assert (status.state, status.reason, status.refunded) == (OrderState.CANCELLED, "review_timeout", False)
    assert status.finished_at is not None
    assert status.finished_at - status.started_at >= timedelta(seconds=harness.policy.review_window_seconds)
    assert_not_called(harness, OrderActivities.charge_payment, OrderActivities.refund_payment)
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_REVIEW, E.CANCELLED]
    assert events[-1].command_id is None
    assert events[-1].data.model_dump(mode="json") == {"reason": "review_timeout", "refunded": False}


async def test_dispatch_failure_makes_the_parent_ship_again(harness: OrderHarness) -> None:
    status = await dispatch_retry_scenario(harness)
    per_shipment = harness.policy.dispatch_attempts_per_shipment

    assert status.state is OrderState.COMPLETED
    assert status.shipping_attempts == 2
    assert status.tracking_number == TRACKING_NUMBER
    assert status.attempts[Step.DISPATCH_CARRIER] == per_shipment + 1
    assert [error.step for error in status.recent_errors] == [Step.DISPATCH_CARRIER] * per_shipment
    # the package was prepared once; the second shipment only dispatches
    assert len(harness.mocks.called(OrderActivities.prepare_package)) == 1
    assert len(harness.mocks.called(OrderActivities.dispatch_carrier)) == per_shipment + 1
    events = assert_numbered(harness)
    assert [event.type for event in events] == [
        *UNTIL_SHIPPING, E.PACKAGE_PREPARED, E.DISPATCH_FAILED,
        E.SHIPPING_STARTED, E.CARRIER_DISPATCHED, E.SHIPPED, E.COMPLETED,
    ]  # fmt: skip
    assert [event.data.model_dump(mode="json") for event in harness.mocks.events_of(E.SHIPPING_STARTED)] == [
        {"shipping_attempt": 1},
        {"shipping_attempt": 2},
    ]
    failed = harness.mocks.events_of(E.DISPATCH_FAILED)[0]
    assert failed.data.model_dump(mode="json")["shipping_attempt"] == 1
    assert f"carrier refused #{per_shipment}" in failed.data.model_dump(mode="json")["reason"]
    assert await harness.shipment_status(1) is WorkflowExecutionStatus.COMPLETED
    assert await harness.shipment_status(2) is WorkflowExecutionStatus.COMPLETED


async def test_a_database_outage_spends_no_attempts_and_the_order_completes(harness: OrderHarness) -> None:
    # three times the dispatch bound fail for want of a database, then it is back: the outage
    # spends none of the shipment's attempts, and each retry waits a little longer
    outage = [database_down] * (3 * harness.policy.dispatch_attempts_per_shipment)
    harness.mocks.script(OrderActivities.dispatch_carrier, *outage)
    await harness.start_and_approve()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert status.shipping_attempts == 1
    assert len(harness.mocks.called(OrderActivities.dispatch_carrier)) == len(outage) + 1
    assert E.DISPATCH_FAILED not in harness.mocks.event_types()


async def test_dispatch_failing_every_time_fails_the_order_and_refunds(harness: OrderHarness) -> None:
    harness.mocks.script(OrderActivities.dispatch_carrier, then=fails("carrier down"))
    await harness.start_and_approve(max_shipping_attempts=2)
    status = await harness.result()

    assert status.state is OrderState.FAILED
    assert status.reason is not None and "dispatch" in status.reason and "carrier down" in status.reason
    assert status.refunded is True
    assert status.shipping_attempts == 2
    assert harness.mocks.called(OrderActivities.refund_payment) == [harness.payment]
    per_shipment = harness.policy.dispatch_attempts_per_shipment
    assert len(harness.mocks.called(OrderActivities.dispatch_carrier)) == 2 * per_shipment
    assert_not_called(harness, OrderActivities.mark_shipped)
    events = assert_numbered(harness)
    assert [event.type for event in events].count(E.DISPATCH_FAILED) == 2
    assert events[-1].type is E.FAILED
    assert events[-1].data.model_dump(mode="json") == {"reason": status.reason, "refunded": True}


async def test_duplicate_commands_apply_once(harness: OrderHarness) -> None:
    # Charging is held back so every signal lands while the order is still waiting to ship.
    gate = asyncio.Event()
    harness.mocks.script(OrderActivities.charge_payment, then=waits_for(gate))
    await harness.start_in_review()
    update_id, approve_id = uuid4(), uuid4()
    await harness.update_address(NEW_ADDRESS, command_id=update_id)
    await harness.update_address(NEW_ADDRESS, command_id=update_id)
    await harness.approve(command_id=approve_id)
    await harness.approve(command_id=approve_id)
    await harness.wait_for_call(OrderActivities.charge_payment)
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
    assert rejected.data.model_dump(mode="json") == {
        "command_type": "ApproveOrder",
        "reason": "order already approved",
    }
    assert [request.address for request in harness.mocks.called(OrderActivities.dispatch_carrier)] == [
        NEW_ADDRESS
    ]


async def test_invalid_order_fails_without_charging(harness: OrderHarness) -> None:
    harness.mocks.script(OrderActivities.validate_order, invalid("each SKU may appear once; repeated: SKU-1"))
    await harness.start()
    status = await harness.result()

    assert status.state is OrderState.FAILED
    assert status.reason == "invalid order: each SKU may appear once; repeated: SKU-1"
    assert status.refunded is False
    assert status.attempts[Step.VALIDATE] == 1, "a business-rule violation is not retried"
    assert_not_called(harness, OrderActivities.charge_payment, OrderActivities.refund_payment)
    events = assert_numbered(harness)
    assert [event.type for event in events] == [E.ADMITTED, E.RECEIVED, E.FAILED]
    assert events[-1].data.model_dump(mode="json") == {"reason": status.reason, "refunded": False}
    assert (await harness.search_attributes()).get(ORDER_STATE) == "failed"
    assert await current_details(harness) == f"**failed** at step done: {status.reason}"


async def test_status_counts_attempts_and_keeps_their_errors(harness: OrderHarness) -> None:
    harness.mocks.script(OrderActivities.receive_order, fails("database away #1"), fails("database away #2"))
    await harness.start_in_review()
    status = await harness.status()

    assert status.attempts[Step.RECEIVE] == 3
    errors = [(error.step, error.attempt, error.error) for error in status.recent_errors]
    assert errors == [(Step.RECEIVE, 1, "database away #1"), (Step.RECEIVE, 2, "database away #2")]
    assert len(harness.mocks.called(OrderActivities.receive_order)) == 3
    await harness.approve()
    assert (await harness.result()).attempts[Step.RECEIVE] == 3


async def test_parallel_attempts_do_not_wait_out_a_hang(harness: OrderHarness) -> None:
    # With two attempts in flight, a hung first attempt does not hold the step up.
    harness.mocks.script(OrderActivities.receive_order, hangs)
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
    harness.mocks.script(OrderActivities.receive_order, then=hangs)
    await harness.start(lifecycle_deadline_seconds=2.0, review_window_seconds=1.0)
    status = await harness.result()

    reason = "deadline_exceeded: step receive still running after 2 s"
    assert (status.state, status.reason, status.refunded) == (OrderState.FAILED, reason, False)
    started = (await harness.handle.describe()).start_time
    assert status.finished_at is not None
    assert timedelta(seconds=2) <= status.finished_at - started <= timedelta(seconds=2.5)
    assert status.attempts[Step.RECEIVE] > 1
    assert all(error.error == "attempt timed out" for error in status.recent_errors)
    assert_not_called(
        harness,
        OrderActivities.validate_order,
        OrderActivities.charge_payment,
        OrderActivities.refund_payment,
    )
    events = assert_numbered(harness)
    assert [event.type for event in events] == [E.ADMITTED, E.FAILED]
    assert events[-1].data.model_dump(mode="json") == {"reason": reason, "refunded": False}


# --- what Temporal shows of the order --------------------------------------------------------------
async def test_temporal_shows_the_state_review_and_amount_as_the_order_goes(harness: OrderHarness) -> None:
    await harness.start_in_review()
    in_review = await harness.search_attributes()
    assert (in_review.get(ORDER_STATE), in_review.get(AWAITING_REVIEW)) == ("awaiting_approval", True)
    assert in_review.get(ORDER_AMOUNT) == AMOUNT_CENTS / 100
    assert await current_details(harness) == "**awaiting_approval** at step review"
    await harness.approve()
    await harness.result()

    done = await harness.search_attributes()
    assert (done.get(ORDER_STATE), done.get(AWAITING_REVIEW)) == ("completed", False)
    history = await harness.handle.fetch_history()
    upserted = [
        decode_typed_search_attributes(
            event.upsert_workflow_search_attributes_event_attributes.search_attributes
        )
        for event in history.events
        if event.HasField("upsert_workflow_search_attributes_event_attributes")
    ]
    lifecycle = ["received", "validated", "awaiting_approval", "approved", "paid", "shipping", "shipped"]
    states = [attributes[ORDER_STATE] for attributes in upserted]
    # one upsert a batch of events (not a state change), none for a batch that leaves the state as it
    # was: the review's and the end's for sure, each state once, in the lifecycle's order
    assert states[-1] == "completed" and "awaiting_approval" in states
    assert states[:-1] == sorted(set(states[:-1]), key=lifecycle.index)
    assert len(states) < len(lifecycle)


async def test_the_workers_refuse_a_namespace_without_the_search_attributes(
    temporal_dev_server: WorkflowEnvironment,
) -> None:
    await require_search_attributes(temporal_dev_server.client)  # the tests' servers register them
    binary = str(Path(sys.executable).parent / "temporal")
    async with await WorkflowEnvironment.start_local(dev_server_existing_path=binary) as bare:
        with pytest.raises(
            RuntimeError, match="lacks the search attributes OrderState, AwaitingReview, OrderAmount"
        ):
            await require_search_attributes(bare.client)


# --- who may steer the order ----------------------------------------------------------------------
def forbidden_commands(harness: OrderHarness) -> list[tuple[object, CommandType]]:
    return [
        (event.command_id, CommandType(event.data.model_dump(mode="json")["command_type"]))
        for event in harness.mocks.events_of(E.COMMAND_REJECTED)
        if event.data.model_dump(mode="json")["reason"] == FORBIDDEN
        and event.data.model_dump(mode="json")["detail"]
    ]


async def test_nobody_approves_an_order_they_placed(harness: OrderHarness) -> None:
    await harness.start_in_review()
    own = await harness.approve(by=CUSTOMER_WHO_REVIEWS)
    await harness.wait_for_event(E.COMMAND_REJECTED)
    assert (await harness.status()).state is OrderState.AWAITING_APPROVAL
    approval = await harness.approve(by=REVIEWER)
    status = await harness.result()

    assert forbidden_commands(harness) == [(own.command_id, CommandType.APPROVE)]
    assert (status.state, status.placed_by, status.approved_by) == (
        OrderState.COMPLETED,
        CUSTOMER.subject,
        REVIEWER.subject,
    )
    [approved] = harness.mocks.events_of(E.APPROVED)
    assert (approved.command_id, approved.data.model_dump(mode="json")["approved_by"]) == (
        approval.command_id,
        REVIEWER.subject,
    )


async def test_a_command_without_a_verified_issuer_or_role_is_forbidden(harness: OrderHarness) -> None:
    await harness.start_in_review()
    anonymous = harness.approval().model_copy(update={"issued_by": None})
    await harness.handle.signal(Signals.APPROVE, anonymous)
    customer_approval = await harness.approve(by=OTHER_CUSTOMER)
    await wait_for_rejections(harness, 2)
    await harness.approve()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert forbidden_commands(harness) == [
        (anonymous.command_id, CommandType.APPROVE),
        (customer_approval.command_id, CommandType.APPROVE),
    ]


async def test_only_the_placer_or_an_operator_changes_the_address(harness: OrderHarness) -> None:
    await harness.start_in_review()
    by_other = await harness.update_address(NEW_ADDRESS, by=OTHER_CUSTOMER)
    by_reviewer = await harness.update_address(NEW_ADDRESS, by=REVIEWER)
    await wait_for_rejections(harness, 2)
    assert (await harness.status()).address == ADDRESS
    other_address = NEW_ADDRESS.model_copy(update={"line1": "3 Operator Way"})
    await harness.update_address(other_address, by=OPERATOR)
    await harness.update_address(NEW_ADDRESS, by=CUSTOMER)
    await harness.approve()
    status = await harness.result()

    assert forbidden_commands(harness) == [
        (by_other.command_id, CommandType.UPDATE_ADDRESS),
        (by_reviewer.command_id, CommandType.UPDATE_ADDRESS),
    ]
    assert [
        event.data.model_dump(mode="json")["address"]["line1"]
        for event in harness.mocks.events_of(E.ADDRESS_UPDATED)
    ] == [
        "3 Operator Way",
        NEW_ADDRESS.line1,
    ]
    assert status.address == NEW_ADDRESS


async def test_a_reviewer_cancels_only_while_the_order_is_in_review(harness: OrderHarness) -> None:
    harness.mocks.script(OrderActivities.dispatch_carrier, then=hangs)
    await harness.start_in_review(
        dispatch_attempts_per_shipment=20
    )  # still dispatching when the cancels land
    by_other = await harness.cancel(by=OTHER_CUSTOMER)
    await wait_for_rejections(harness, 1)
    await harness.approve()
    await harness.wait_for_call(OrderActivities.dispatch_carrier)
    by_reviewer = await harness.cancel(by=REVIEWER)  # its rejection goes out with the shipment's end
    by_operator = await harness.cancel("stopped by operations", by=OPERATOR)
    status = await harness.result()

    assert forbidden_commands(harness) == [
        (by_other.command_id, CommandType.CANCEL),
        (by_reviewer.command_id, CommandType.CANCEL),
    ]
    assert (status.state, status.refunded) == (OrderState.CANCELLED, True)
    assert harness.mocks.events_of(E.CANCELLED)[0].command_id == by_operator.command_id


async def test_a_reviewer_cancels_an_order_in_review(harness: OrderHarness) -> None:
    await harness.start_in_review()
    cancel = await harness.cancel("not plausible", by=REVIEWER)
    status = await harness.result()

    assert (status.state, status.reason) == (OrderState.CANCELLED, "not plausible")
    assert harness.mocks.events_of(E.CANCELLED)[0].command_id == cancel.command_id
    assert harness.mocks.events_of(E.COMMAND_REJECTED) == []


async def test_an_early_approval_by_the_placer_is_forbidden(harness: OrderHarness) -> None:
    own = harness.approval(by=CUSTOMER_WHO_REVIEWS)
    await harness.start_and_approve(first_seq=2, early_commands=[own])
    status = await harness.result()

    assert forbidden_commands(harness) == [(own.command_id, CommandType.APPROVE)]
    assert status.approved_by == REVIEWER.subject


async def wait_for_rejections(harness: OrderHarness, count: int) -> None:
    await wait_until(
        lambda: len(harness.mocks.events_of(E.COMMAND_REJECTED)) >= count, f"{count} rejection(s)"
    )


# --- admission: the start input ------------------------------------------------------------------
async def test_an_admitted_order_numbers_after_queued_and_applies_its_early_commands(
    harness: OrderHarness,
) -> None:
    status, (approval, update) = await early_commands_scenario(harness)

    assert status.state is OrderState.COMPLETED
    assert status.address == NEW_ADDRESS
    assert status.queued_at is not None
    events = assert_numbered(harness, first_seq=2)  # the bridge's `queued` was seq 1
    assert [event.type for event in events] == [E.ADMITTED, E.ADDRESS_UPDATED, *HAPPY_EVENTS[1:]]
    admitted = events[0].data.model_dump(mode="json")
    assert admitted["queued_at"] == status.queued_at.isoformat()
    assert admitted["admission_wait_seconds"] >= 1.5
    assert [(event.type, event.command_id) for event in events if event.command_id is not None] == [
        (E.ADDRESS_UPDATED, update.command_id),
        (E.APPROVED, approval.command_id),
    ]
    dispatched_to = [request.address for request in harness.mocks.called(OrderActivities.dispatch_carrier)]
    assert dispatched_to == [NEW_ADDRESS]


async def test_an_order_started_without_waiting_says_so(harness: OrderHarness) -> None:
    await harness.start()
    admitted = await harness.wait_for_event(E.ADMITTED)

    assert admitted.seq == 1
    assert admitted.data.model_dump(mode="json") == {"queued_at": None, "admission_wait_seconds": None}
    assert (await harness.status()).queued_at is None


async def test_early_commands_sent_again_as_signals_apply_once(harness: OrderHarness) -> None:
    gate = asyncio.Event()
    harness.mocks.script(OrderActivities.charge_payment, then=waits_for(gate))
    approval, update = harness.approval(), harness.address_update(NEW_ADDRESS)
    await harness.start(activity_attempt_timeout_seconds=5.0, first_seq=2, early_commands=[approval, update])
    await harness.wait_for_call(OrderActivities.charge_payment)
    await harness.approve(command_id=approval.command_id)
    await harness.update_address(NEW_ADDRESS, command_id=update.command_id)
    other = await harness.approve()
    await harness.wait_for_event(E.COMMAND_REJECTED)  # handled in order: the duplicates were too
    gate.set()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    events = assert_numbered(harness, first_seq=2)
    assert [(event.type, event.command_id) for event in events if event.command_id is not None] == [
        (E.ADDRESS_UPDATED, update.command_id),
        (E.APPROVED, approval.command_id),
        (E.COMMAND_REJECTED, other.command_id),
    ]


# --- admission: the slot during the review -------------------------------------------------------
async def test_the_slot_is_given_back_for_the_review_and_taken_again_once_approved(
    harness: OrderHarness,
) -> None:
    await harness.start()
    await harness.wait_for_call(OrderActivities.leave_admission_for_review)
    assert_not_called(harness, OrderActivities.resume_admission)
    await harness.approve()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    admission = [harness.order_id]
    assert harness.mocks.called(OrderActivities.leave_admission_for_review) == admission
    assert harness.mocks.called(OrderActivities.resume_admission) == admission


async def test_an_order_approved_within_the_grace_keeps_its_slot(harness: OrderHarness) -> None:
    await harness.start_and_approve(review_slot_grace_seconds=30.0)
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert_not_called(harness, OrderActivities.leave_admission_for_review, OrderActivities.resume_admission)


async def test_an_order_not_approved_within_the_grace_gives_its_slot_back_then(
    harness: OrderHarness, time_skipping_env: WorkflowEnvironment
) -> None:
    await harness.start_in_review(review_slot_grace_seconds=30.0, review_window_seconds=60.0)
    await time_skipping_env.sleep(20)
    assert_not_called(harness, OrderActivities.leave_admission_for_review)
    await time_skipping_env.sleep(15)
    await harness.wait_for_call(OrderActivities.leave_admission_for_review)
    await harness.approve()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert len(harness.mocks.called(OrderActivities.resume_admission)) == 1


async def test_an_order_approved_before_its_review_keeps_its_slot(harness: OrderHarness) -> None:
    status, _ = await early_commands_scenario(harness)

    assert status.state is OrderState.COMPLETED
    assert_not_called(harness, OrderActivities.leave_admission_for_review, OrderActivities.resume_admission)


async def approved_with_no_slot_free(harness: OrderHarness, asks: int, **policy: Any) -> None:
    """Start and approve the order (`policy` as for `start`); its first `asks` for a slot find none."""
    harness.mocks.no_slot_answers = asks
    await harness.start_and_approve(**policy)
    await harness.wait_for_call(OrderActivities.resume_admission)


async def test_an_approved_order_waits_for_a_slot_and_goes_on_when_one_is_handed_to_it(
    harness: OrderHarness,
) -> None:
    await approved_with_no_slot_free(harness, asks=1)
    await asyncio.sleep(0.3)
    assert_not_called(harness, OrderActivities.charge_payment)  # no slot: it waits
    waiting = await harness.status()
    assert waiting.state is OrderState.APPROVED and waiting.waiting_for_slot_since is not None

    await harness.handle.signal(Signals.SLOT_FREED)
    await harness.wait_for_call(OrderActivities.charge_payment)  # woken: no recheck timer passed
    status = await harness.result()

    assert status.state is OrderState.COMPLETED and status.waiting_for_slot_since is None
    assert len(harness.mocks.called(OrderActivities.resume_admission)) == 2


async def test_the_wait_for_a_slot_after_approval_does_not_count_against_the_deadline(
    harness: OrderHarness,
) -> None:
    # no wake-up ever comes: the order asks again every few seconds, far past its deadline
    await approved_with_no_slot_free(harness, asks=4, lifecycle_deadline_seconds=3.0)
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert len(harness.mocks.called(OrderActivities.resume_admission)) == 5
    assert status.finished_at is not None
    assert status.finished_at - status.started_at >= 4 * SLOT_RECHECK


async def test_a_cancel_while_waiting_for_a_slot_ends_the_order_and_its_place_in_line(
    harness: OrderHarness,
) -> None:
    await approved_with_no_slot_free(harness, asks=1000)
    await harness.cancel()
    status = await harness.result()

    assert (status.state, status.refunded) == (OrderState.CANCELLED, False)
    assert_not_called(harness, OrderActivities.charge_payment)
    assert harness.mocks.called(OrderActivities.release_admission) == [harness.order_id]


# --- events and the admission slot ----------------------------------------------------------------
async def test_events_wait_in_order_while_the_broker_is_away(harness: OrderHarness) -> None:
    # The first batch cannot be published for a while: its activity retries (1.5 s of backoff,
    # within the review window), and later events queue behind it.
    away = [fails("broker away")] * 4
    harness.mocks.script(OrderActivities.publish_events, *away)
    status, _ = await happy_path_scenario(harness)

    assert status.state is OrderState.COMPLETED
    events = assert_numbered(harness)
    assert [event.type for event in events] == HAPPY_EVENTS
    assert len(harness.mocks.called(OrderActivities.publish_events)) > len(away)


async def test_the_shipment_start_batch_falls_back_to_an_activity_while_the_broker_is_away(
    harness: OrderHarness,
) -> None:
    # The batch that waits for the task after the shipment's start is sent from there by a local
    # activity; when the broker does not take it, by a regular activity, retried until it does.
    harness.mocks.script(OrderActivities.publish_events, passes, *[fails("broker away")] * 4)
    status, _ = await happy_path_scenario(harness)

    assert status.state is OrderState.COMPLETED
    events = assert_numbered(harness)
    assert [event.type for event in events] == HAPPY_EVENTS
    assert await activities_scheduled(harness) == 3  # the first and last batches', the second's fallback


async def test_the_events_of_a_workflow_task_go_out_together(harness: OrderHarness) -> None:
    # One publish per workflow task, once it is committed: the local steps a task runs do not
    # split its events (each batch is an activity, and a workflow task to hear it is done).
    await happy_path_scenario(harness)

    published = harness.mocks.called(OrderActivities.publish_events)
    batches = [[event.type for event in batch] for batch in published]
    assert [event_type for batch in batches for event_type in batch] == HAPPY_EVENTS
    assert batches == [
        UNTIL_REVIEW,  # the first task: admission, receive, validate, review
        [E.APPROVED, E.PAYMENT_CHARGED, E.SHIPPING_STARTED],  # the approval's, with the charge
        # the shipment's progress report waits for its outcome; the last task marks it shipped
        [E.PACKAGE_PREPARED, E.CARRIER_DISPATCHED, E.SHIPPED, E.COMPLETED],
    ]
    # The approval's task starts the shipment, whose start is sure to bring the next task: its
    # batch goes out there by a local activity, the other two by an activity of their own.
    assert await activities_scheduled(harness) == 2


async def test_every_ending_gives_the_admission_slot_back_once(harness: OrderHarness) -> None:
    harness.mocks.script(OrderActivities.release_admission, fails("database away"), fails("database away"))
    await harness.start()
    status = await harness.result()  # the review window passes

    assert status.state is OrderState.CANCELLED
    released = harness.mocks.called(OrderActivities.release_admission)
    assert released == [harness.order_id] * 3  # retried until it got through


# --- production's attempts ------------------------------------------------------------------------
async def test_production_attempts_against_the_fault_mix_complete_and_replay(
    harness_on_dev_server: OrderHarness,
) -> None:
    # Three attempts in flight, 0.3 s each, against mocks that fail, hang or pass like the fault
    # injector: losers are cancelled in flight, and the histories that leaves replay as recorded.
    harness = harness_on_dev_server
    status, _ = await happy_path_scenario(harness)

    assert status.state is OrderState.COMPLETED
    assert {error.error for error in status.recent_errors} <= {
        "Forced failure for testing",
        "attempt timed out",
    }
    assert_numbered(harness)
    replayer = Replayer(
        workflows=[OrderWorkflow, ShippingWorkflow],
        data_converter=harness.client.data_converter,
        workflow_runner=sandbox_runner(),
    )
    for history in (await harness.histories()).values():
        assert (await replayer.replay_workflow(history)).replay_failure is None


async def test_deadline_ends_a_shipment_whose_dispatch_never_succeeds(
    harness_on_own_server: OrderHarness,
) -> None:
    # The shipment gives up at the lifecycle's deadline itself: its workflow task is open while
    # attempts are in flight, so it would see the order's cancel only at the task's next renewal.
    harness = harness_on_own_server
    harness.mocks.script(OrderActivities.dispatch_carrier, then=hangs)
    await harness.start(
        lifecycle_deadline_seconds=3.0, review_window_seconds=2.0, dispatch_attempts_per_shipment=50
    )
    await harness.wait_for_event(E.AWAITING_APPROVAL)
    await harness.approve()
    status = await harness.result()

    reason = "deadline_exceeded: step dispatch_carrier still running after 3 s"
    assert (status.state, status.reason, status.refunded) == (OrderState.FAILED, reason, True)
    started = (await harness.handle.describe()).start_time
    assert status.finished_at is not None
    assert status.finished_at - started <= timedelta(seconds=3.5)
    assert status.shipping_attempts == 1
    events = assert_numbered(harness)
    assert [event.type for event in events] == [*UNTIL_SHIPPING, E.PACKAGE_PREPARED, E.FAILED]


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
    harness.mocks.script(OrderActivities.dispatch_carrier, waits_for(gate, then=refused), refused)
    await harness.start_and_approve()
    await harness.wait_for_call(OrderActivities.dispatch_carrier)
    async with harness.worker_stopped(Role.ORDERS):
        gate.set()
        await harness.wait_for_shipment(1, WorkflowExecutionStatus.COMPLETED)
        update = await harness.update_address(NEW_ADDRESS)
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert status.address == NEW_ADDRESS
    dispatched_to = [request.address for request in harness.mocks.called(OrderActivities.dispatch_carrier)]
    assert dispatched_to == [ADDRESS, ADDRESS, NEW_ADDRESS]
    assert harness.mocks.events_of(E.ADDRESS_UPDATED)[0].command_id == update.command_id
    events = assert_numbered(harness)
    assert [event.type for event in events][-5:] == [
        E.ADDRESS_UPDATED,
        E.SHIPPING_STARTED,
        E.CARRIER_DISPATCHED,
        E.SHIPPED,
        E.COMPLETED,
    ]


async def test_address_update_during_the_dispatch_reaches_the_carrier(harness: OrderHarness) -> None:
    # The update reaches the shipment while its dispatch to the old address is in flight. The
    # attempt is a local activity, so the shipment's workflow task is open until the attempt
    # passes and only then takes the update; its result must not report the old address as done.
    gate = asyncio.Event()
    harness.mocks.script(OrderActivities.dispatch_carrier, waits_for(gate))
    await harness.start_and_approve(activity_attempt_timeout_seconds=5.0)
    await harness.wait_for_call(OrderActivities.dispatch_carrier)
    await harness.update_address(NEW_ADDRESS)
    await harness.wait_for_shipment_history(1, HistoryEventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    gate.set()
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    assert status.address == NEW_ADDRESS
    dispatched = harness.mocks.events_of(E.CARRIER_DISPATCHED)
    dispatched_to = [request.address for request in harness.mocks.called(OrderActivities.dispatch_carrier)]
    # the update was accepted (address_updated), so the carrier must end up with the new address
    assert E.ADDRESS_UPDATED in harness.mocks.event_types()
    assert dispatched_to[-1] == NEW_ADDRESS, (
        f"the carrier was last given {dispatched_to[-1].line1!r}, the order says {status.address.line1!r}"
    )
    assert dispatched[-1].data.model_dump(mode="json")["address"] == NEW_ADDRESS.model_dump()
    assert_numbered(harness)


async def test_address_update_overtaken_by_the_dispatch_report_is_not_claimed(
    stoppable_harness: OrderHarness,
) -> None:
    # The shipment has dispatched to the old address and ended, but the order has not seen its
    # result when the update arrives: the order worker is away while the shipment completes and
    # the update is sent. Signals are handled before the child's result, so the order accepts the
    # update, then learns that the carrier has the old address.
    harness = stoppable_harness
    gate = asyncio.Event()
    harness.mocks.script(OrderActivities.dispatch_carrier, waits_for(gate))
    await harness.start_and_approve(activity_attempt_timeout_seconds=5.0)
    await harness.wait_for_call(OrderActivities.dispatch_carrier)
    async with harness.worker_stopped(Role.ORDERS):
        gate.set()
        await harness.wait_for_shipment(1, WorkflowExecutionStatus.COMPLETED)
        await harness.update_address(NEW_ADDRESS)
    status = await harness.result()

    assert status.state is OrderState.COMPLETED
    dispatched_to = [request.address for request in harness.mocks.called(OrderActivities.dispatch_carrier)]
    reported = Address.model_validate(
        harness.mocks.events_of(E.CARRIER_DISPATCHED)[-1].data.model_dump(mode="json")["address"]
    )
    # whatever the order decides about the late update, what it reports must be what the carrier got
    assert reported == dispatched_to[-1], (
        f"carrier_dispatched reports {reported.line1!r} but the carrier was given {dispatched_to[-1].line1!r}"
    )
    assert status.address == dispatched_to[-1], (
        f"the order's address is {status.address.line1!r}"
        f" but the carrier was given {dispatched_to[-1].line1!r}"
    )
    assert_numbered(harness)
