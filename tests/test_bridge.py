"""The command bridge against real RabbitMQ, PostgreSQL and a Temporal dev server.

A stand-in `OrderWorkflow` (registered under the real name) records the input and the signals
it receives, so the tests see exactly what the bridge delivered to Temporal. The rules the bridge
decides by are tested in memory in tests/test_bridge_rules.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pydantic import BaseModel
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from temporalio import workflow
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from services.bridge.consumer import run_bridge
from services.bridge.issuers import NO_ROLE
from services.bridge.lifecycles import PLACE_COMMAND_MEMO
from shared.authorization import FORBIDDEN
from shared.broker import (
    ERROR_HEADER,
    declare_command_queue,
    declare_placement_queue,
)
from shared.contracts import (
    Actor,
    ApproveOrder,
    CancelOrder,
    Command,
    EventType,
    OrderEvent,
    Role,
    UpdateAddress,
)
from shared.db import ProcessedCommand
from shared.lifecycle import ORDER_WORKFLOW, OrderWorkflowInput, Signals, order_workflow_id
from shared.settings import Settings
from testsupport.amqp import (
    Broker,
    consumer_queue,
    dead_letter_of,
    dead_lettered,
    drain,
    own_queues,
    publish,
    publish_raw,
    take_messages,
    verdict,
    was_dead_lettered,
)
from testsupport.orders import approve_order, cancel_order, place_order, unique_id, update_address
from testsupport.polling import eventually
from testsupport.services import DownDatabase, running
from testsupport.temporal import described


# --- the stand-in workflow -----------------------------------------------------------------------
class ReceivedSignal(BaseModel):
    name: str
    command: dict[str, Any]


@workflow.defn(name=ORDER_WORKFLOW)
class StandInOrderWorkflow:
    """Records its input and the command signals it gets, and runs until cancelled."""

    def __init__(self) -> None:
        self._input: OrderWorkflowInput | None = None
        self._signals: list[ReceivedSignal] = []

    @workflow.run
    async def run(self, start: OrderWorkflowInput) -> None:
        self._input = start
        await workflow.wait_condition(lambda: False)

    @workflow.signal(name=Signals.APPROVE)
    def approve(self, command: ApproveOrder) -> None:
        self._record(Signals.APPROVE, command)

    @workflow.signal(name=Signals.CANCEL)
    def cancel(self, command: CancelOrder) -> None:
        self._record(Signals.CANCEL, command)

    @workflow.signal(name=Signals.UPDATE_ADDRESS)
    def update_address(self, command: UpdateAddress) -> None:
        self._record(Signals.UPDATE_ADDRESS, command)

    @workflow.query
    def started_with(self) -> OrderWorkflowInput | None:
        return self._input

    @workflow.query
    def signals(self) -> list[ReceivedSignal]:
        return self._signals

    def _record(self, name: str, command: ApproveOrder | CancelOrder | UpdateAddress) -> None:
        self._signals.append(ReceivedSignal(name=name, command=command.model_dump(mode="json")))


# --- commands: as the tests' broker user (a delegate with every role) names their issuers ----------
STRANGER = Actor(subject="stranger", roles=frozenset({Role.CUSTOMER}))


def signal_of(name: str, command: Command) -> ReceivedSignal:
    return ReceivedSignal(name=name, command=command.model_dump(mode="json"))


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def bridge_settings(settings: Settings) -> Settings:
    """A task queue and command queues of this test's own; a poison message gets two tries. The
    stand-in lifecycles never end, so the admission bound is out of the way (tests/test_admission.py
    covers it)."""
    return own_queues(settings, max_command_deliveries=2, max_running_lifecycles=100_000)


@pytest_asyncio.fixture
async def command_queue(bridge_settings: Settings, broker_channel: Broker) -> AsyncIterator[str]:
    channel, topology = broker_channel
    async with (
        consumer_queue(declare_placement_queue(channel, topology, bridge_settings)),
        consumer_queue(declare_command_queue(channel, topology, bridge_settings)),
    ):
        yield bridge_settings.command_queue


@pytest_asyncio.fixture
async def stand_in_worker(bridge_settings: Settings, temporal_client: Client) -> AsyncIterator[None]:
    async with Worker(
        temporal_client,
        task_queue=bridge_settings.order_task_queue,
        workflows=[StandInOrderWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        yield


@pytest_asyncio.fixture
async def bridge(
    bridge_settings: Settings,
    command_queue: str,
    stand_in_worker: None,
    db_sessions: async_sessionmaker[AsyncSession],  # the schema exists
) -> AsyncIterator[Settings]:
    """The bridge running against a worker that hosts the stand-in workflow."""
    async with running(run_bridge, bridge_settings):
        yield bridge_settings


@pytest_asyncio.fixture
async def rejections(broker_channel: Broker) -> AbstractQueue:
    """Every `order.command_rejected` event published while the test runs."""
    channel, topology = broker_channel
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(topology.events, routing_key=EventType.COMMAND_REJECTED.routing_key)
    return queue


@dataclass(frozen=True)
class BridgeRig:
    """The running bridge (its settings), the broker, Temporal, the rejections and the database."""

    settings: Settings
    channel: Broker
    client: Client
    rejections: AbstractQueue
    sessions: async_sessionmaker[AsyncSession]


@pytest.fixture
def rig(
    bridge: Settings,
    broker_channel: Broker,
    temporal_client: Client,
    rejections: AbstractQueue,
    db_sessions: async_sessionmaker[AsyncSession],
) -> BridgeRig:
    return BridgeRig(bridge, broker_channel, temporal_client, rejections, db_sessions)


# --- helpers -------------------------------------------------------------------------------------
async def started(rig: BridgeRig) -> str:
    """A new order placed through the bridge, once its workflow runs: its id."""
    order_id = unique_id("ord")
    await publish(rig.channel, place_order(order_id))
    await described(rig.client, order_id)
    return order_id


async def signals_received(client: Client, order_id: str, count: int) -> list[ReceivedSignal]:
    """The stand-in's signals, once it has at least `count` of them."""
    handle = client.get_workflow_handle((await described(client, order_id)).id)

    async def at_least_count() -> list[ReceivedSignal]:
        signals = await handle.query(StandInOrderWorkflow.signals)
        return signals if len(signals) >= count else []

    return await eventually(at_least_count)


async def commands_received(client: Client, order_id: str, count: int) -> list[UUID]:
    """Ids of the commands the stand-in got, at its start (early commands) or as signals."""
    handle = client.get_workflow_handle((await described(client, order_id)).id)

    async def at_least_count() -> list[UUID]:
        start = await handle.query(StandInOrderWorkflow.started_with)
        signals = await handle.query(StandInOrderWorkflow.signals)
        early = [command.command_id for command in start.early_commands] if start else []
        received = early + [UUID(signal.command["command_id"]) for signal in signals]
        return received if len(received) >= count else []

    return await eventually(at_least_count)


async def rejections_of(rejections: AbstractQueue, command: Command, count: int = 1) -> list[OrderEvent]:
    messages = await take_messages(rejections, lambda m: _event(m).command_id == command.command_id, count)
    return [_event(message) for message in messages]


async def rejection_of(rejections: AbstractQueue, command: Command) -> OrderEvent:
    [rejection] = await rejections_of(rejections, command)
    return rejection


def _event(message: AbstractIncomingMessage) -> OrderEvent:
    return OrderEvent.model_validate_json(message.body)


async def outcome_of(sessions: async_sessionmaker[AsyncSession], command: Command) -> str | None:
    async with sessions() as session:
        return await session.scalar(
            select(col(ProcessedCommand.outcome)).where(
                col(ProcessedCommand.command_id) == command.command_id
            )
        )


async def recorded_outcome(sessions: async_sessionmaker[AsyncSession], command: Command) -> str:
    return await eventually(lambda: outcome_of(sessions, command))


def assert_rejected(event: OrderEvent, command: Command, reason: str) -> None:
    assert event.type is EventType.COMMAND_REJECTED
    assert (event.order_id, event.seq, event.command_id) == (
        command.order_id,
        0,
        command.command_id,
    )
    assert event.correlation_id == command.correlation_id
    assert event.data.model_dump(mode="json") == {"command_type": command.type.value, "reason": reason}


# --- starting workflows --------------------------------------------------------------------------
async def test_place_order_starts_the_order_workflow(rig: BridgeRig) -> None:
    order_id = unique_id("ord")
    command = place_order(order_id)
    await publish(rig.channel, command)

    description = await described(rig.client, order_id)
    assert description.id == order_workflow_id(order_id)
    assert description.workflow_type == ORDER_WORKFLOW
    assert description.task_queue == rig.settings.order_task_queue
    assert await description.memo_value(PLACE_COMMAND_MEMO) == str(command.command_id)
    started_with = await rig.client.get_workflow_handle(description.id).query(
        StandInOrderWorkflow.started_with
    )
    assert started_with is not None and started_with.queued_at is not None
    assert started_with == OrderWorkflowInput(
        order=command,
        policy=rig.settings.lifecycle_policy(),
        queued_at=started_with.queued_at,
        first_seq=2,  # after the bridge's `queued`
    )
    assert await recorded_outcome(rig.sessions, command) == "accepted"


async def test_a_second_place_order_for_the_same_order_is_rejected(rig: BridgeRig) -> None:
    order_id = unique_id("ord")
    first, second = place_order(order_id), place_order(order_id)
    await publish(rig.channel, first)
    started = await described(rig.client, order_id)
    await publish(rig.channel, second)

    assert_rejected(await rejection_of(rig.rejections, second), second, "order already exists")
    assert await recorded_outcome(rig.sessions, second) == "rejected"
    still = await rig.client.get_workflow_handle(order_workflow_id(order_id)).describe()
    assert still.run_id == started.run_id
    started_with = await rig.client.get_workflow_handle(started.id).query(StandInOrderWorkflow.started_with)
    assert started_with is not None and started_with.order == first


async def test_a_place_order_redelivered_after_its_workflow_started_is_a_duplicate(rig: BridgeRig) -> None:
    """The bridge stopped after starting the workflow and before recording the command."""
    command = place_order(unique_id("ord"))
    await rig.client.start_workflow(
        ORDER_WORKFLOW,
        OrderWorkflowInput(order=command, policy=rig.settings.lifecycle_policy()),
        id=order_workflow_id(command.order_id),
        task_queue=rig.settings.order_task_queue,
        memo={PLACE_COMMAND_MEMO: str(command.command_id)},
    )
    await publish(rig.channel, command)

    assert await recorded_outcome(rig.sessions, command) == "duplicate"
    # a rejection would have been confirmed by the broker before the outcome was recorded
    assert [_event(message) for message in await drain(rig.rejections)] == []


# --- signals -------------------------------------------------------------------------------------
async def test_commands_reach_the_workflow_as_signals_in_order(rig: BridgeRig) -> None:
    order_id = await started(rig)
    approval, address_change, cancellation = (
        approve_order(order_id),
        update_address(order_id),
        cancel_order(order_id),
    )
    await publish(rig.channel, approval, address_change, cancellation)

    assert await signals_received(rig.client, order_id, 3) == [
        signal_of(Signals.APPROVE, approval),
        signal_of(Signals.UPDATE_ADDRESS, address_change),
        signal_of(Signals.CANCEL, cancellation),
    ]


async def test_place_and_approve_published_back_to_back_apply_in_that_order(
    bridge_settings: Settings,
    command_queue: str,
    stand_in_worker: None,
    db_sessions: async_sessionmaker[AsyncSession],
    broker_channel: Broker,
    temporal_client: Client,
    rejections: AbstractQueue,
) -> None:
    orders = [
        (place_order(order_id), approve_order(order_id)) for order_id in (unique_id("ord") for _ in range(8))
    ]
    # all waiting before the bridge starts, so it takes them in one burst and handles them at once
    await publish(broker_channel, *(command for pair in orders for command in pair))

    async with running(run_bridge, bridge_settings):
        for place, approval in orders:
            # placements and commands travel on two queues: an approval that finds its order not
            # started yet is handed to the lifecycle at its start instead of signalled
            assert await commands_received(temporal_client, place.order_id, 1) == [approval.command_id]
    assert await drain(rejections) == []


async def test_a_command_delivered_twice_has_one_effect(rig: BridgeRig) -> None:
    order_id = unique_id("ord")
    place, approval, cancellation = place_order(order_id), approve_order(order_id), cancel_order(order_id)
    relocation, last = update_address(order_id), update_address(order_id)
    await publish(rig.channel, place, place)
    await described(rig.client, order_id)
    # one order's commands apply in arrival order: once the last arrived, the repeats were handled
    await publish(rig.channel, relocation, relocation, approval, approval, cancellation, cancellation, last)

    assert await signals_received(rig.client, order_id, 4) == [
        signal_of(Signals.UPDATE_ADDRESS, relocation),
        signal_of(Signals.APPROVE, approval),
        signal_of(Signals.CANCEL, cancellation),
        signal_of(Signals.UPDATE_ADDRESS, last),
    ]
    # the two copies of the placement may be in hand at once: which records first is open
    assert await recorded_outcome(rig.sessions, place) in {"accepted", "duplicate"}
    for command in (relocation, approval, cancellation):
        assert await recorded_outcome(rig.sessions, command) == "accepted"
    assert await drain(rig.rejections) == []


# --- rejections ----------------------------------------------------------------------------------
async def test_a_forbidden_command_is_rejected_once_recorded_and_never_applied(rig: BridgeRig) -> None:
    order_id = await started(rig)
    by_a_customer = approve_order(order_id).model_copy(update={"issued_by": STRANGER})
    await publish(rig.channel, by_a_customer, by_a_customer)
    cancellation = cancel_order(order_id)
    await publish(rig.channel, cancellation)

    # handled in arrival order: the cancel arrived last, so the approvals were dealt with
    assert await signals_received(rig.client, order_id, 1) == [signal_of(Signals.CANCEL, cancellation)]
    [rejection] = await rejections_of(rig.rejections, by_a_customer)
    assert rejection.seq == 0
    assert rejection.data.model_dump(mode="json") == {
        "command_type": "ApproveOrder",
        "reason": FORBIDDEN,
        "detail": NO_ROLE,
    }
    assert await recorded_outcome(rig.sessions, by_a_customer) == "rejected"
    assert await drain(rig.rejections) == []  # the second copy, handled after it, was a duplicate


async def test_a_command_for_an_unknown_order_is_rejected(rig: BridgeRig) -> None:
    command = approve_order(unique_id("ord"))
    await publish(rig.channel, command)

    assert_rejected(await rejection_of(rig.rejections, command), command, "unknown order")

    # parked first (recorded `accepted`), the record is replaced just after the rejection's publish
    async def rejected() -> bool:
        return await outcome_of(rig.sessions, command) == "rejected"

    await eventually(rejected)


async def test_a_command_for_an_ended_order_is_rejected(rig: BridgeRig) -> None:
    order_id = await started(rig)
    handle = rig.client.get_workflow_handle(order_workflow_id(order_id))
    await handle.cancel()
    await eventually(lambda: _has_status(handle, WorkflowExecutionStatus.CANCELED))

    command = update_address(order_id)
    await publish(rig.channel, command)
    assert_rejected(await rejection_of(rig.rejections, command), command, "order already ended")


async def _has_status(handle: WorkflowHandle[Any, Any], status: WorkflowExecutionStatus) -> bool:
    return (await handle.describe()).status == status


# --- failures ------------------------------------------------------------------------------------
async def test_invalid_messages_are_dead_lettered_and_the_bridge_keeps_serving(
    bridge: Settings,
    broker_channel: Broker,
    rejections: AbstractQueue,
    dead_letters: AbstractQueue,
) -> None:
    commands = broker_channel[1].commands
    without_payload = place_order(unique_id("ord")).model_dump(mode="json", exclude={"payload"})
    not_json = await publish_raw(commands, "order.place", b"{not json")
    not_a_command = await publish_raw(commands, "order.place", json.dumps(without_payload).encode())
    valid = approve_order(unique_id("ord"))
    await publish(broker_channel, valid)

    assert_rejected(await rejection_of(rejections, valid), valid, "unknown order")
    dead = await dead_lettered(dead_letters, {not_json, not_a_command})
    assert verdict(dead[not_json]) == ("invalid_json", "bridge")
    assert verdict(dead[not_a_command]) == ("schema_invalid", "bridge")
    assert "payload" in str(dead[not_a_command].headers[ERROR_HEADER])
    assert dead[not_json].body == b"{not json"


@pytest_asyncio.fixture
async def poisoned_orders(db_sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[str]:
    """Recording a command of an order whose id starts with this prefix and '-' always fails."""
    statements = [
        """CREATE FUNCTION test_reject_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.order_id LIKE 'poison-%' THEN RAISE EXCEPTION 'poisoned order'; END IF;
             RETURN NEW;
           END $$""",
        """CREATE TRIGGER test_reject_poison BEFORE INSERT ON processed_commands
           FOR EACH ROW EXECUTE FUNCTION test_reject_poison()""",
    ]
    await _execute(db_sessions, statements)
    try:
        yield "poison"
    finally:
        await _execute(
            db_sessions,
            [
                "DROP TRIGGER test_reject_poison ON processed_commands",
                "DROP FUNCTION test_reject_poison()",
            ],
        )


async def _execute(sessions: async_sessionmaker[AsyncSession], statements: list[str]) -> None:
    async with sessions() as session, session.begin():
        for statement in statements:
            await session.execute(text(statement))


async def test_a_command_that_keeps_failing_is_dead_lettered_after_its_deliveries(
    poisoned_orders: str,
    bridge: Settings,
    broker_channel: Broker,
    rejections: AbstractQueue,
    dead_letters: AbstractQueue,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    poison = approve_order(unique_id(poisoned_orders))
    await publish(broker_channel, poison)

    dead = await dead_letter_of(dead_letters, str(poison.command_id))
    assert verdict(dead) == ("processing_failed", "bridge")
    assert "poisoned order" in str(dead.headers[ERROR_HEADER])
    assert await outcome_of(db_sessions, poison) is None

    valid = approve_order(unique_id("ord"))
    await publish(broker_channel, valid)
    assert_rejected(await rejection_of(rejections, valid), valid, "unknown order")


async def test_a_database_outage_neither_loses_nor_dead_letters_a_command(
    bridge_settings: Settings,
    command_queue: str,
    broker_channel: Broker,
    rejections: AbstractQueue,
    dead_letters: AbstractQueue,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    command = approve_order(unique_id("ord"))
    await publish(broker_channel, command)
    async with DownDatabase() as down, running(run_bridge, down.settings_for(bridge_settings)):
        await eventually(down.retried)

    assert not await was_dead_lettered(dead_letters, str(command.command_id))
    async with running(run_bridge, bridge_settings):
        assert_rejected(await rejection_of(rejections, command), command, "unknown order")
    assert await outcome_of(db_sessions, command) == "rejected"
