"""However an order ends, it ends truthfully: cancelled or terminated by an operator through
Temporal, cancelled before it started, failed early. Status, read model, history and Temporal's
search attributes agree, and no payment stays charged. Real workers (order worker
only: shipments never run here, so a charged order stays in `shipping` until we act), bridge,
audit consumer, PostgreSQL, RabbitMQ and a Temporal dev server; a database and vhost of this
module's own, so the reconciler sees only these orders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import uuid4

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from devstack.stack import drop_vhost
from services.audit.consumer import run_audit
from services.bridge.consumer import run_bridge
from services.workers import reconciler
from services.workers.activities import BusinessActivities
from services.workers.business_functions import PaymentStatus
from services.workers.order_workflow import CANCELLED_THROUGH_TEMPORAL
from services.workers.reconciler import Reconciler
from services.workers.visibility import AWAITING_REVIEW, ORDER_STATE
from services.workers.worker import order_worker
from shared import broker, db, schema
from shared.admission_table import AdmissionSlots, AdmissionStatus
from shared.contracts import CancelOrder, EventType, OrderItem, OrderState, PlaceOrder, Role
from shared.db import Admission, AuditEvent, Order, Payment, ProcessedCommand
from shared.lifecycle import order_summary, order_workflow_id
from shared.settings import Settings
from testsupport.amqp import moved_to
from testsupport.gateway import bearer, gateway
from testsupport.orders import approve_order, cancel_order, place_order
from testsupport.polling import eventually
from testsupport.services import running
from testsupport.session import session_name

RECONCILER_DATABASE = session_name("orderflow_test_reconciler")
Sessions = async_sessionmaker[AsyncSession]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def reconciler_settings(settings: Settings) -> AsyncIterator[Settings]:
    test_id = uuid4().hex[:8]
    isolated = moved_to(settings, RECONCILER_DATABASE).model_copy(
        update={
            "temporal_address": settings.temporal_address,
            "order_task_queue": f"order-tq-{test_id}",
            "shipping_task_queue": f"shipping-tq-{test_id}",  # nobody polls it
            "review_window_seconds": 60.0,
            "lifecycle_deadline_seconds": 90.0,
        }
    )
    await schema.drop_database(isolated.database_url)
    await schema.ensure_database(isolated.database_url)
    await asyncio.to_thread(schema.upgrade, isolated.database_url)
    yield isolated
    drop_vhost(RECONCILER_DATABASE)


@pytest_asyncio.fixture(loop_scope="session")
async def sessions(reconciler_settings: Settings) -> AsyncIterator[Sessions]:
    engine = db.create_engine(reconciler_settings)
    yield db.session_factory(engine)
    await engine.dispose()


@dataclass(frozen=True)
class Pipeline:
    """What a test places orders through and reads them from, and the reconciler to call."""

    topology: broker.Topology
    reconciler: Reconciler
    client: Client
    settings: Settings
    sessions: Sessions

    async def place(self, approve: bool = False) -> PlaceOrder:
        order = place_order(f"rec-{uuid4().hex[:10]}")
        await broker.publish_command(self.topology, order)
        if approve:
            await broker.publish_command(self.topology, approve_order(order.order_id))
        return order

    async def in_review(self) -> PlaceOrder:
        order = await self.place()
        await reaches(self.sessions, order.order_id, OrderState.AWAITING_APPROVAL)
        return order

    def workflow(self, order: PlaceOrder) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(order_workflow_id(order.order_id))

    def operator_api(self) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        return gateway(self.settings, bearer(self.settings, "ops", Role.OPERATOR))


@pytest_asyncio.fixture(loop_scope="session")
async def pipeline(
    reconciler_settings: Settings,
    sessions: Sessions,
    temporal_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Pipeline]:
    """Bridge, audit consumer and order worker running; the reconciler, not yet, for the test to
    call; it acts on workflows closed any time ago."""
    monkeypatch.setattr(reconciler, "SETTLE_TIME", timedelta(0))
    settings = reconciler_settings
    connection = await broker.connect(settings, "tests")
    try:
        channel, topology = await broker.open_channel(connection)
        await broker.declare_command_queues(channel, topology, settings)  # before anything is sent
        slots = AdmissionSlots(sessions, settings.max_running_lifecycles)
        activities = BusinessActivities(sessions, topology, connection, slots, temporal_client)
        async with (
            running(run_audit, settings),
            running(run_bridge, settings),
            order_worker(temporal_client, settings.order_task_queue, activities),
        ):
            reconciling = Reconciler(temporal_client, sessions, topology, slots)
            yield Pipeline(topology, reconciling, temporal_client, settings, sessions)
    finally:
        await connection.close()


async def state_of(sessions: Sessions, order_id: str) -> OrderState | None:
    async with sessions() as session:
        order = await session.get(Order, order_id)
    return OrderState(order.state) if order else None


async def reaches(sessions: Sessions, order_id: str, state: OrderState) -> None:
    async def reached() -> bool:
        return await state_of(sessions, order_id) is state

    await eventually(reached, timeout=20)


async def trail(sessions: Sessions, order_id: str) -> list[AuditEvent]:
    async with sessions() as session:
        rows = await session.scalars(
            select(AuditEvent).where(col(AuditEvent.order_id) == order_id).order_by(col(AuditEvent.seq))
        )
        return list(rows)


async def row_of(sessions: Sessions, model: type, key: str) -> object:
    async with sessions() as session:
        return await session.get(model, key)


async def gapless_trail_ending_with(sessions: Sessions, order_id: str, last: EventType) -> list[AuditEvent]:
    """The order's audit trail once its `last` event is in (the orders row can get there first: the
    bridge writes it in the state of its own events), numbered without a gap."""

    async def ended() -> list[AuditEvent] | None:
        events = await trail(sessions, order_id)
        return events if events and events[-1].type == last.value else None

    events = await eventually(ended, timeout=20, what=f"a trail of {order_id} ending with {last.value}")
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    assert sum(EventType(event.type).is_terminal for event in events) == 1
    return events


async def test_a_terminated_order_in_review_is_reported_terminated_and_its_slot_released(
    pipeline: Pipeline, sessions: Sessions
) -> None:
    order = await pipeline.in_review()
    still_running = await pipeline.in_review()

    async def slot_given_back() -> bool:  # after the review's grace: its row no longer holds one
        admission = await row_of(sessions, Admission, order.order_id)
        return isinstance(admission, Admission) and admission.status == AdmissionStatus.REVIEWING.value

    await eventually(slot_given_back)
    await pipeline.workflow(order).terminate(reason="stuck in a test")
    async with pipeline.operator_api() as api:
        # at once, before the reconciler: the workflow's stale answer is not taken
        status = (await api.get(f"/orders/{order.order_id}")).json()
        assert (status["state"], status["source"]) == ("terminated", "read_model")
        assert await pipeline.reconciler.reconcile() == [order.order_id]  # the running one is left alone
        assert await pipeline.reconciler.reconcile() == []  # and once is enough

        await reaches(sessions, order.order_id, OrderState.TERMINATED)
        status = (await api.get(f"/orders/{order.order_id}")).json()
        assert status["state"] == "terminated" and "stuck in a test" in status["reason"]
        listed = (await api.get("/orders", params={"state": "terminated"})).json()
        assert order.order_id in [item["order_id"] for item in listed["items"]]
    events = await gapless_trail_ending_with(sessions, order.order_id, EventType.TERMINATED)
    ending = dict(events[-1].data)
    reason = ending.pop("reason")
    assert isinstance(reason, str)
    assert reason.startswith("terminated through Temporal by ") and reason.endswith(": stuck in a test")
    assert ending == {"workflow_status": "terminated", "charged": False, "refunded": False}
    payment = await row_of(sessions, Payment, order.payload.payment_id)
    assert isinstance(payment, Payment) and payment.status == PaymentStatus.VOIDED.value
    admission = await row_of(sessions, Admission, order.order_id)
    assert isinstance(admission, Admission) and admission.status == AdmissionStatus.ENDED.value
    assert await state_of(sessions, still_running.order_id) is OrderState.AWAITING_APPROVAL


async def test_a_terminated_charged_order_is_refunded_and_says_it_was_charged(
    pipeline: Pipeline, sessions: Sessions
) -> None:
    order = await pipeline.place(approve=True)
    await reaches(sessions, order.order_id, OrderState.SHIPPING)  # and stays: no shipping worker

    await pipeline.workflow(order).terminate(reason="operator pulled the plug")
    assert await pipeline.reconciler.reconcile() == [order.order_id]

    await reaches(sessions, order.order_id, OrderState.TERMINATED)
    events = await gapless_trail_ending_with(sessions, order.order_id, EventType.TERMINATED)
    assert EventType.PAYMENT_CHARGED.value in [event.type for event in events]
    assert events[-1].data["charged"] is True and events[-1].data["refunded"] is True
    payment = await row_of(sessions, Payment, order.payload.payment_id)
    assert isinstance(payment, Payment) and payment.status == PaymentStatus.REFUNDED.value


async def test_a_cancellation_through_temporal_ends_the_order_and_the_read_model_agrees(
    pipeline: Pipeline, sessions: Sessions
) -> None:
    # (a cancel after payment refunds: tests/test_order_workflow.py; here the whole path to the
    # read model, in review, since a shipment that no worker runs could not be cancelled)
    order = await pipeline.in_review()
    handle = pipeline.workflow(order)
    await handle.cancel()

    await reaches(sessions, order.order_id, OrderState.CANCELLED)

    async def closed_as_canceled() -> bool:
        return (await handle.describe()).status is WorkflowExecutionStatus.CANCELED

    await eventually(closed_as_canceled)
    async with pipeline.operator_api() as api:
        status = (await api.get(f"/orders/{order.order_id}")).json()
    assert (status["state"], status["reason"]) == ("cancelled", CANCELLED_THROUGH_TEMPORAL)
    events = await gapless_trail_ending_with(sessions, order.order_id, EventType.CANCELLED)
    assert events[-1].data == {"reason": CANCELLED_THROUGH_TEMPORAL, "refunded": False}
    async with sessions() as session:
        stored = await session.get(Order, order.order_id)
    assert stored is not None and stored.reason == CANCELLED_THROUGH_TEMPORAL
    admission = await row_of(sessions, Admission, order.order_id)
    assert isinstance(admission, Admission) and admission.status == AdmissionStatus.ENDED.value
    assert await pipeline.reconciler.reconcile() == []  # it ended itself: nothing to reconcile


def invalid_order() -> PlaceOrder:
    """An order that fails validation: a SKU twice."""
    order = place_order(f"rec-invalid-{uuid4().hex[:8]}")
    items = [OrderItem(sku="A", qty=1)] * 2
    return order.model_copy(update={"payload": order.payload.model_copy(update={"items": items})})


async def test_the_read_model_holds_every_accepted_order_whatever_its_first_event(
    pipeline: Pipeline, sessions: Sessions
) -> None:
    # orders that end before their `received`: cancelled before their placement arrived (the
    # cancel waits for it), cancelled right behind it, and one that fails validation
    early = place_order(f"rec-early-{uuid4().hex[:8]}")
    behind = place_order(f"rec-behind-{uuid4().hex[:8]}")
    invalid = invalid_order()
    early_cancel: CancelOrder = cancel_order(early.order_id)
    for command in (early_cancel, early, behind, cancel_order(behind.order_id), invalid):
        await broker.publish_command(pipeline.topology, command)

    expected = {
        early.order_id: OrderState.CANCELLED,
        behind.order_id: OrderState.CANCELLED,
        invalid.order_id: OrderState.FAILED,
    }
    for order_id, state in expected.items():
        await reaches(sessions, order_id, state)
        ending = EventType.CANCELLED if state is OrderState.CANCELLED else EventType.FAILED
        await gapless_trail_ending_with(sessions, order_id, ending)
    assert (await trail(sessions, early.order_id))[-1].command_id == early_cancel.command_id


async def forget_outcome(sessions: Sessions, command_id: object) -> None:
    """As if the bridge had crashed after applying the command and before recording it."""
    async with sessions() as session, session.begin():
        await session.execute(delete(ProcessedCommand).where(col(ProcessedCommand.command_id) == command_id))


async def outcome_of(sessions: Sessions, command_id: object) -> ProcessedCommand | None:
    async with sessions() as session:
        return await session.get(ProcessedCommand, command_id)


async def test_a_command_delivered_again_after_its_order_ended_is_a_duplicate_not_a_rejection(
    pipeline: Pipeline, sessions: Sessions
) -> None:
    topology = pipeline.topology
    order = await pipeline.place()
    approval = approve_order(order.order_id)
    await broker.publish_command(topology, approval)
    await reaches(sessions, order.order_id, OrderState.SHIPPING)  # approved: it took the command
    early_cancel = cancel_order(f"rec-gone-{uuid4().hex[:8]}")
    waiting = place_order(early_cancel.order_id)
    await broker.publish_command(topology, early_cancel)
    await broker.publish_command(topology, waiting)
    await reaches(sessions, waiting.order_id, OrderState.CANCELLED)

    await pipeline.workflow(order).terminate(reason="ended")
    for command in (approval, early_cancel):
        await forget_outcome(sessions, command.command_id)
        await broker.publish_command(topology, command)

    async def redelivery_recorded() -> bool:
        return all([await outcome_of(sessions, c.command_id) for c in (approval, early_cancel)])

    await eventually(redelivery_recorded)
    await asyncio.sleep(1)  # a rejection would be published before the outcome is recorded
    approved, cancelled = [await outcome_of(sessions, c.command_id) for c in (approval, early_cancel)]
    assert approved is not None and approved.outcome == "duplicate"
    assert cancelled is not None and cancelled.outcome == "accepted"
    for command in (approval, early_cancel):
        rejections = [
            e for e in await trail(sessions, command.order_id) if e.type == EventType.COMMAND_REJECTED.value
        ]
        assert rejections == []


async def listed_in_temporal_as(client: Client, state: OrderState, order: PlaceOrder) -> None:
    """Until a visibility query by the `OrderState` search attribute finds the order's workflow."""
    query = f"OrderState = '{state.value}' AND WorkflowId = '{order_workflow_id(order.order_id)}'"

    async def listed() -> bool:
        return [execution.id async for execution in client.list_workflows(query)] != []

    await eventually(listed, what=f"{order.order_id} listed by {query}")


async def test_temporal_lists_failed_and_cancelled_orders_by_their_state_with_the_bridges_summary(
    pipeline: Pipeline, sessions: Sessions
) -> None:
    invalid = invalid_order()
    await broker.publish_command(pipeline.topology, invalid)
    cancelled = await pipeline.in_review()
    in_review = (await pipeline.workflow(cancelled).describe()).typed_search_attributes
    assert (in_review.get(ORDER_STATE), in_review.get(AWAITING_REVIEW)) == ("awaiting_approval", True)
    await broker.publish_command(pipeline.topology, cancel_order(cancelled.order_id))
    await reaches(sessions, cancelled.order_id, OrderState.CANCELLED)
    await reaches(sessions, invalid.order_id, OrderState.FAILED)

    await listed_in_temporal_as(pipeline.client, OrderState.FAILED, invalid)
    await listed_in_temporal_as(pipeline.client, OrderState.CANCELLED, cancelled)
    for order in (invalid, cancelled):
        description = await pipeline.workflow(order).describe()
        assert description.typed_search_attributes.get(AWAITING_REVIEW) is False
        assert await description.static_summary() == order_summary(order)
        # the order's ending is its own: the workflow completes, whatever the order's state
        assert description.status is WorkflowExecutionStatus.COMPLETED
