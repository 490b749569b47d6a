"""Admission and shedding against real RabbitMQ, PostgreSQL and a Temporal dev server.

The slot count is global per database, so this module has a database (and vhost) of its own. A
stand-in `OrderWorkflow` holds its slot until it is approved or cancelled (or, for orders named
`auto-...`, for a moment), then releases it the way the real lifecycle does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import pytest
import pytest_asyncio
from aio_pika.abc import AbstractQueue
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RawValue
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from services.bridge.consumer import run_bridge
from shared import broker, db, schema
from shared.admission_table import AdmissionSlots, AdmissionStatus
from shared.broker import (
    CommandRefused,
    declare_command_queue,
    declare_placement_queue,
    publish_command,
)
from shared.contracts import (
    ApproveOrder,
    EventType,
    OrderEvent,
    OrderState,
    Role,
)
from shared.db import Admission, Order
from shared.lifecycle import (
    ORDER_WORKFLOW,
    OrderWorkflowInput,
    Signals,
    order_workflow_id,
)
from shared.settings import Settings
from testsupport.amqp import Broker, consumer_queue, drain, moved_to, own_queues, publish, take_messages
from testsupport.gateway import bearer, gateway
from testsupport.orders import approve_order, cancel_order, order_body, place_order, unique_id, update_address
from testsupport.polling import eventually
from testsupport.services import running
from testsupport.session import session_name
from testsupport.temporal import describe_if_started, described

ADMISSION_DATABASE = session_name("orderflow_test_admission")


# --- the stand-in lifecycle ----------------------------------------------------------------------
ENDED_BY_SIGNAL = {Signals.APPROVE: "approved", Signals.CANCEL: "cancelled"}
HOLDING_SLOT = [status for status in AdmissionStatus if status.holds_slot]


class SlotActivities:
    """What the stand-in does outside the workflow: count slots in use, release its own."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], max_running: int) -> None:
        self._sessions = sessions
        self._slots = AdmissionSlots(sessions, max_running)
        self.slots_seen: list[int] = []

    @activity.defn
    async def occupy(self) -> None:
        async with self._sessions() as session:
            holding = await session.scalar(
                select(func.count()).select_from(Admission).where(col(Admission.status).in_(HOLDING_SLOT))
            )
        self.slots_seen.append(holding or 0)

    @activity.defn
    async def release(self, order_id: str) -> None:
        await self._slots.release(order_id)


@workflow.defn(name=ORDER_WORKFLOW)
class StandInLifecycle:
    """Holds its slot until approved or cancelled (`auto-...` orders: at once), then releases it."""

    # what a run has seen so far (each run sets its own)
    _ended_by: str | None = None
    _early: tuple[str, ...] = ()

    @workflow.run
    async def run(self, start: OrderWorkflowInput) -> str:
        self._early = tuple(str(command.command_id) for command in start.early_commands)
        if any(isinstance(command, ApproveOrder) for command in start.early_commands):
            self._ended_by = "approved early"
        await workflow.execute_activity_method(
            SlotActivities.occupy, start_to_close_timeout=timedelta(seconds=5)
        )
        if start.order.order_id.startswith("auto-"):
            self._ended_by = "auto"
        await workflow.wait_condition(lambda: self._ended_by is not None)
        await workflow.execute_activity_method(
            SlotActivities.release, start.order.order_id, start_to_close_timeout=timedelta(seconds=5)
        )
        assert self._ended_by is not None
        return self._ended_by

    @workflow.signal(dynamic=True)
    def command(self, name: str, _: Sequence[RawValue]) -> None:
        """An approval or a cancel ends it (an address change does not)."""
        self._ended_by = ENDED_BY_SIGNAL.get(name, self._ended_by)

    @workflow.query
    def early_commands(self) -> list[str]:
        return list(self._early)


# --- fixtures ------------------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def admission_base(settings: Settings) -> AsyncIterator[Settings]:
    isolated = moved_to(settings, ADMISSION_DATABASE).model_copy(
        update={"temporal_address": settings.temporal_address}
    )
    await schema.drop_database(isolated.database_url)
    await schema.ensure_database(isolated.database_url)
    await asyncio.to_thread(schema.upgrade, isolated.database_url)
    yield isolated


@pytest_asyncio.fixture(loop_scope="session")
async def sessions(admission_base: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = db.create_engine(admission_base)
    factory = db.session_factory(engine)
    async with factory() as session, session.begin():
        await session.execute(text("TRUNCATE admissions, orders, processed_commands"))
    yield factory
    await engine.dispose()


@pytest.fixture
def admission_settings(admission_base: Settings) -> Settings:
    return own_queues(
        admission_base, max_running_lifecycles=3, placement_backlog_limit=500, placement_prefetch=50
    )


@pytest_asyncio.fixture(loop_scope="session")
async def channel(admission_settings: Settings) -> AsyncIterator[Broker]:
    connection = await broker.connect(admission_settings, "tests")
    try:
        opened = await broker.open_channel(connection)
        yield opened
    finally:
        await connection.close()


@pytest_asyncio.fixture(loop_scope="session")
async def queues(admission_settings: Settings, channel: Broker) -> AsyncIterator[None]:
    """The bridge's queues, declared before anything is published to them."""
    ch, topology = channel
    async with (
        consumer_queue(declare_placement_queue(ch, topology, admission_settings)),
        consumer_queue(declare_command_queue(ch, topology, admission_settings)),
    ):
        yield


@pytest_asyncio.fixture(loop_scope="session")
async def slot_activities(
    admission_settings: Settings,
    temporal_client: Client,
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[SlotActivities]:
    activities = SlotActivities(sessions, admission_settings.max_running_lifecycles)
    async with Worker(
        temporal_client,
        task_queue=admission_settings.order_task_queue,
        workflows=[StandInLifecycle],
        activities=[activities.occupy, activities.release],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        yield activities


@pytest_asyncio.fixture(loop_scope="session")
async def events(channel: Broker) -> AbstractQueue:
    queue = await channel[0].declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(channel[1].events, routing_key="order.#")
    return queue


@dataclass(frozen=True)
class AdmissionRig:
    """A bridge's world with the stand-in lifecycle: its settings, broker, Temporal and database."""

    settings: Settings
    channel: Broker
    client: Client
    sessions: async_sessionmaker[AsyncSession]
    slots: SlotActivities


@pytest.fixture
def rig(
    admission_settings: Settings,
    queues: None,
    slot_activities: SlotActivities,
    channel: Broker,
    temporal_client: Client,
    sessions: async_sessionmaker[AsyncSession],
) -> AdmissionRig:
    """What a test of admission needs, with the bridge's queues declared and the stand-in polling."""
    return AdmissionRig(admission_settings, channel, temporal_client, sessions, slot_activities)


async def result_of(client: Client, order_id: str) -> str:
    handle = client.get_workflow_handle((await described(client, order_id)).id)
    return str(await asyncio.wait_for(handle.result(), timeout=30))


async def admission_status(sessions: async_sessionmaker[AsyncSession], order_id: str) -> str | None:
    async with sessions() as session:
        return await session.scalar(select(col(Admission.status)).where(col(Admission.order_id) == order_id))


async def statuses_of(sessions: async_sessionmaker[AsyncSession], order_ids: list[str]) -> dict[str, int]:
    async with sessions() as session:
        rows = await session.execute(
            select(col(Admission.status), func.count())
            .where(col(Admission.order_id).in_(order_ids))
            .group_by(col(Admission.status))
        )
        return dict(rows.all())


async def reaches(sessions: async_sessionmaker[AsyncSession], order_id: str, status: str) -> None:
    async def there() -> bool:
        return await admission_status(sessions, order_id) == status

    await eventually(there)


async def events_of(queue: AbstractQueue, order_id: str, count: int) -> list[OrderEvent]:
    messages = await take_messages(
        queue, lambda m: OrderEvent.model_validate_json(m.body).order_id == order_id, count
    )
    return [OrderEvent.model_validate_json(m.body) for m in messages]


# --- tests ---------------------------------------------------------------------------------------
async def test_above_the_bound_every_placement_waits_its_turn_and_runs(rig: AdmissionRig) -> None:
    placements = [place_order(unique_id("auto")) for _ in range(40)]
    await publish(rig.channel, *placements)  # all waiting before the bridge starts

    async with running(run_bridge, rig.settings):
        results = await asyncio.gather(*(result_of(rig.client, p.order_id) for p in placements))

    assert results == ["auto"] * 40
    assert len(rig.slots.slots_seen) == 40
    assert max(rig.slots.slots_seen) <= 3
    for placement in placements:
        assert await admission_status(rig.sessions, placement.order_id) == "ended"


async def test_an_approval_for_a_running_order_is_not_held_up_by_waiting_placements(
    rig: AdmissionRig,
) -> None:
    running_orders = [place_order(unique_id("ord")) for _ in range(3)]
    waiting = [place_order(unique_id("ord")) for _ in range(120)]
    async with running(run_bridge, rig.settings):
        await publish(rig.channel, *running_orders)
        for placement in running_orders:
            await described(rig.client, placement.order_id)
        await publish(rig.channel, *waiting)
        # the bridge holds (and registered) 50 of them; the rest wait in the broker
        await reaches(rig.sessions, waiting[49].order_id, "waiting")

        loop = asyncio.get_running_loop()
        approved_at = loop.time()
        await publish(rig.channel, approve_order(running_orders[0].order_id))
        assert await result_of(rig.client, running_orders[0].order_id) == "approved"
        assert loop.time() - approved_at < 3.0
        # its slot went to one of the waiting placements (about in arrival order, not strictly)
        held = [placement.order_id for placement in waiting[:50]]

        async def one_more_runs() -> bool:
            return await statuses_of(rig.sessions, held) == {"running": 1, "waiting": 49}

        await eventually(one_more_runs)
        assert await admission_status(rig.sessions, waiting[-1].order_id) is None


async def test_commands_for_a_waiting_order_apply_to_it(rig: AdmissionRig, events: AbstractQueue) -> None:
    blockers = [place_order(unique_id("ord")) for _ in range(3)]
    to_cancel, to_steer = place_order(unique_id("ord")), place_order(unique_id("ord"))
    async with running(run_bridge, rig.settings):
        await publish(rig.channel, *blockers)
        for placement in blockers:
            await described(rig.client, placement.order_id)
        await publish(rig.channel, to_cancel, to_steer)
        await reaches(rig.sessions, to_steer.order_id, "waiting")

        # status and list show a waiting order as queued
        async with rig.sessions() as session:
            order = await session.get(Order, to_steer.order_id)
        assert order is not None and order.state == OrderState.QUEUED.value

        cancellation = cancel_order(to_cancel.order_id)
        address_change, approval = update_address(to_steer.order_id), approve_order(to_steer.order_id)
        await publish(rig.channel, cancellation, address_change, approval)
        queued, cancelled = await events_of(events, to_cancel.order_id, 2)
        assert (queued.type, queued.seq) == (EventType.QUEUED, 1)
        assert (cancelled.type, cancelled.seq, cancelled.command_id) == (
            EventType.CANCELLED,
            2,
            cancellation.command_id,
        )
        assert (
            cancelled.data.model_dump(mode="json")["refunded"] is False
            and cancelled.data.model_dump(mode="json")["admitted"] is False
        )

        # free the slots: the cancelled order never starts, the other starts with its commands
        await publish(rig.channel, *(approve_order(b.order_id) for b in blockers))
        assert await result_of(rig.client, to_steer.order_id) == "approved early"
        handle = rig.client.get_workflow_handle(order_workflow_id(to_steer.order_id))
        assert await handle.query(StandInLifecycle.early_commands) == [
            str(address_change.command_id),
            str(approval.command_id),
        ]
        assert await admission_status(rig.sessions, to_cancel.order_id) == "cancelled"
        never_started = rig.client.get_workflow_handle(order_workflow_id(to_cancel.order_id))
        assert await describe_if_started(never_started) is None


async def test_a_full_backlog_refuses_placements_at_the_door(
    admission_settings: Settings, channel: Broker, sessions: async_sessionmaker[AsyncSession]
) -> None:
    limited = admission_settings.model_copy(update={"placement_backlog_limit": 5})
    async with (
        consumer_queue(declare_placement_queue(channel[0], channel[1], limited)) as placements,
        consumer_queue(declare_command_queue(channel[0], channel[1], limited)),
    ):
        accepted = 0
        # no bridge runs, so all wait; a quorum queue may take one past its limit
        with pytest.raises(CommandRefused):  # noqa: PT012 (the refusal ends the count of those accepted)
            while accepted <= limited.placement_backlog_limit + 1:
                await publish_command(channel[1], place_order(unique_id("ord")))
                accepted += 1
        assert accepted >= limited.placement_backlog_limit

        async with gateway(limited, bearer(limited, "shopper", Role.CUSTOMER)) as client:
            response = await client.post("/orders", json=order_body())
        assert response.status_code == 503
        assert response.headers["Retry-After"] == str(limited.shed_retry_after_seconds)
        assert "waiting to start" in response.json()["detail"]
        # nothing half-done: the backlog holds what was accepted, nothing else
        assert (await placements.declare()).message_count == accepted


async def test_two_bridges_share_the_bound_and_keep_each_order_s_commands_in_order(
    rig: AdmissionRig, events: AbstractQueue
) -> None:
    orders = [place_order(unique_id("ord")) for _ in range(30)]
    follow_ups = [
        cancel_order(o.order_id) if i % 5 == 0 else approve_order(o.order_id) for i, o in enumerate(orders)
    ]
    async with running(run_bridge, rig.settings), running(run_bridge, rig.settings):
        for placement, follow_up in zip(orders, follow_ups, strict=True):
            await publish(rig.channel, placement, follow_up)  # back to back, as a client would

        for placement, follow_up in zip(orders, follow_ups, strict=True):
            if isinstance(follow_up, ApproveOrder):
                assert await result_of(rig.client, placement.order_id) in ("approved", "approved early")
            else:
                await _cancelled_either_way(rig.client, rig.sessions, placement.order_id)
    rejected = [e for e in await _drain_events(events) if e.type is EventType.COMMAND_REJECTED]
    assert rejected == []
    assert max(rig.slots.slots_seen) <= rig.settings.max_running_lifecycles


async def _cancelled_either_way(
    client: Client, sessions: async_sessionmaker[AsyncSession], order_id: str
) -> None:
    """Cancelled while running (signal) or before it started (never runs)."""

    async def ended() -> bool:
        status = await admission_status(sessions, order_id)
        return status in ("cancelled", "ended")

    await eventually(ended)
    if await admission_status(sessions, order_id) == "ended":
        assert await result_of(client, order_id) == "cancelled"


async def _drain_events(queue: AbstractQueue) -> list[OrderEvent]:
    return [OrderEvent.model_validate_json(m.body) for m in await drain(queue)]


async def test_a_command_that_overtakes_its_placement_waits_for_it(rig: AdmissionRig) -> None:
    placement = place_order(unique_id("ord"))
    approval = approve_order(placement.order_id)
    async with running(run_bridge, rig.settings):
        await publish(rig.channel, approval)  # another bridge still has the placement in hand, say
        await reaches(rig.sessions, placement.order_id, "unplaced")
        await publish(rig.channel, placement)
        assert await result_of(rig.client, placement.order_id) == "approved early"
