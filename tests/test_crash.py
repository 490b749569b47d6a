"""Crashes in the middle of the work: the services killed -9 and the servers restarted while orders
are in flight, and afterwards every order complete, once.

The system runs as in tests/test_e2e.py (the `make run` launcher, the real fault injector), but on
servers of its own (testsupport/servers.py): a PostgreSQL and a RabbitMQ that may be restarted
without disturbing anybody else's tests, and a Temporal dev server that keeps its state in a file
and so survives its own restart.

A service is killed mid-work at a point where the work itself is made to wait, not at a moment
guessed with a sleep: in a transaction it holds open, the test writes or locks what the work is
about to write (the payment of a charge, the tracking record of a placement, the audit table and
an order's read-model row), sees the service's session waiting for it in `pg_blocking_pids`, kills
the service, and rolls its transaction back. The work then happens as if the test had never been
there. A server is restarted while orders are under way.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel
from sqlalchemy import Executable, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from temporalio.client import Client

from devstack.servers import PrivatePostgres, PrivateRabbitMQ
from devstack.stack import Stack, TemporalDevServer, free_port, running_stack
from shared import broker, db
from shared.contracts import EventType, OrderStatus, Role
from shared.db import AuditEvent, Order, Payment, ProcessedCommand
from shared.lifecycle import STATUS_QUERY, order_workflow_id
from shared.settings import Settings
from shared.temporal import connect_temporal
from testsupport.gateway import bearer
from testsupport.orders import ONCE_PER_COMPLETED_ORDER, approve_order, order_body_of, place_order, unique_id
from testsupport.polling import eventually
from testsupport.servers import (
    ServerPrograms,
    on_private_servers,
    private_servers,
    publish_until_confirmed,
)
from testsupport.system import LIFECYCLE_TIMEOUT, EventLog, audit_trail, full_trail_stored

pytestmark = pytest.mark.e2e

CRASH_DATABASE = "orderflow_crash"
EVENTS_QUEUE = "crash-tests.events"
OUTAGE_SECONDS = 2.0  # long enough for every service to run into a server that is down


@dataclass(frozen=True)
class CrashSystem:
    settings: Settings
    stack: Stack
    postgres: PrivatePostgres
    rabbitmq: PrivateRabbitMQ
    temporal: Client


@dataclass(frozen=True)
class Subscriber:
    """The tests' connection: publishes commands, collects every event."""

    channel: AbstractChannel
    topology: broker.Topology
    events: EventLog


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def crash(
    tmp_path_factory: pytest.TempPathFactory, base_settings: Settings, server_programs: ServerPrograms
) -> AsyncIterator[CrashSystem]:
    """api, bridge, workers and audit as processes, on private servers and a Temporal dev server
    that keeps its state in a file."""
    temporal = TemporalDevServer(
        port=free_port(),
        ui_port=free_port(),
        db_file=tmp_path_factory.mktemp("temporal") / "temporal.db",
        ui=False,
    )
    async with private_servers(server_programs) as (postgres, rabbitmq):
        # the session's identities, keys and publishers' roles, on servers of its own
        settings = on_private_servers(base_settings, postgres, rabbitmq, temporal, CRASH_DATABASE)
        # a batch is what arrived while the last one committed, with no window: the mid-batch kill's premise
        settings = settings.model_copy(update={"audit_batch_linger_ms": 0})
        with tempfile.NamedTemporaryFile("w+", prefix="orderflow-crash-", suffix=".log", delete=False) as log:
            try:
                async with running_stack(settings, temporal=temporal, log=log) as stack:
                    client = await connect_temporal(settings)
                    yield CrashSystem(settings, stack, postgres, rabbitmq, client)
            finally:
                print(f"service logs: {log.name}")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db_sessions(crash: CrashSystem) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on the private server's database (each connection checked first: the test does not
    retry a read on a connection that died with a restart)."""
    engine = db.create_engine(crash.settings, pre_ping=True)
    yield db.session_factory(engine)
    await engine.dispose()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def amqp(crash: CrashSystem) -> AsyncIterator[Subscriber]:
    connection = await broker.connect(crash.settings, "crash-tests")
    try:
        channel, topology = await broker.open_channel(connection)
        events = EventLog()
        # durable: what is published while the broker restarts waits for us in it
        queue = await channel.declare_queue(EVENTS_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(topology.events, routing_key="order.#")
        await queue.consume(events.on_message)
        yield Subscriber(channel, topology, events)
    finally:
        await connection.close()


@pytest_asyncio.fixture(loop_scope="session")
async def api(crash: CrashSystem) -> AsyncIterator[httpx.AsyncClient]:
    customer = bearer(crash.settings, "crash-customer", Role.CUSTOMER)
    async with httpx.AsyncClient(base_url=crash.settings.api_url, timeout=10, headers=customer) as client:
        yield client


@pytest.fixture(autouse=True)
def no_service_gave_up(crash: CrashSystem) -> Iterator[None]:
    """Whatever a test does to them, the services must still run afterwards (nobody restarts a
    service that exits by itself)."""
    yield
    assert crash.stack.exited() == {}


async def place_and_approve(subscriber: Subscriber, order_ids: list[str]) -> None:
    """Place the orders and approve each when it asks for it."""
    for order_id in order_ids:
        await publish_until_confirmed(subscriber.topology, place_order(order_id))
    for order_id in order_ids:
        await subscriber.events.wait_for(order_id, EventType.AWAITING_APPROVAL)
        await publish_until_confirmed(subscriber.topology, approve_order(order_id))


async def lifecycle_ended(temporal: Client, order_id: str) -> bool:
    """The order's workflow says it has reached its end (its events may wait to be published)."""
    handle = temporal.get_workflow_handle(order_workflow_id(order_id))
    status: OrderStatus = await handle.query(STATUS_QUERY, result_type=OrderStatus)
    return status.state.is_terminal


async def completed(subscriber: Subscriber, order_ids: list[str]) -> None:
    endings = [await subscriber.events.wait_for_end(order_id) for order_id in order_ids]
    assert [e.type for e in endings] == [EventType.COMPLETED] * len(order_ids), [e.data for e in endings]


@dataclass(frozen=True)
class Hold:
    """A transaction of the test's, holding rows or locks until it is rolled back."""

    sessions: async_sessionmaker[AsyncSession]
    session: AsyncSession
    pid: int

    async def someone_waits(self) -> bool:
        """Whether another session waits for us now."""
        async with self.sessions() as observer:
            waiting = await observer.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                {"pid": self.pid},
            )
        return bool(waiting)

    async def release(self) -> None:
        await self.session.rollback()


@asynccontextmanager
async def holding(sessions: async_sessionmaker[AsyncSession], statement: Executable) -> AsyncIterator[Hold]:
    """Run `statement` in a transaction held open until the block ends (or `release`), then rolled
    back: whoever needs what it wrote or locked meanwhile waits for us, in the middle of its work."""
    async with sessions() as session:
        async with asyncio.timeout(LIFECYCLE_TIMEOUT):  # what we wait for ourselves must not hang the test
            await session.execute(statement)
        backend_pid = await session.scalar(select(func.pg_backend_pid()))
        assert backend_pid is not None
        hold = Hold(sessions, session, backend_pid)
        try:
            yield hold
        finally:
            await hold.release()


async def assert_completed_once(
    sessions: async_sessionmaker[AsyncSession], events: EventLog, order_id: str
) -> None:
    """Every event the order published is stored once, numbered 1, 2, 3, ...; each step happened
    once; one payment, charged; and the read model says completed, with the tracking number."""
    trail = await full_trail_stored(sessions, events, order_id)
    assert [row.seq for row in trail] == list(range(1, len(trail) + 1))
    assert {row.event_id for row in trail} == {event.event_id for event in events.by_order[order_id]}
    kinds = [row.type for row in trail]
    assert {kind: kinds.count(kind) for kind in ONCE_PER_COMPLETED_ORDER} == dict.fromkeys(
        ONCE_PER_COMPLETED_ORDER, 1
    )
    async with sessions() as session:
        order = await session.get(Order, order_id)
        payments = await session.scalars(select(Payment).where(col(Payment.order_id) == order_id))
        charges = [(payment.payment_id, payment.status) for payment in payments]
    assert order is not None
    shipped = next(row for row in trail if row.type == "shipped")
    assert (order.state, order.last_event_seq, order.tracking_number) == (
        "completed",
        len(trail),
        shipped.data["tracking_number"],
    )
    assert charges == [(f"pay-{order_id}", "charged")]


# --- the services killed -9 -----------------------------------------------------------------------


async def test_workers_killed_during_a_charge_charge_once_and_complete(
    crash: CrashSystem, amqp: Subscriber, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = unique_id("crash-charge")
    await publish_until_confirmed(amqp.topology, place_order(order_id))
    await amqp.events.wait_for(order_id, EventType.AWAITING_APPROVAL)

    payment = insert(Payment).values(
        payment_id=f"pay-{order_id}", order_id=order_id, amount_cents=1, status="charged"
    )
    async with holding(db_sessions, payment) as claim:
        await publish_until_confirmed(amqp.topology, approve_order(order_id))
        await eventually(claim.someone_waits)  # a charge attempt is in the worker, writing the payment
        await crash.stack.crash_and_restart("workers")

    await completed(amqp, [order_id])
    await assert_completed_once(db_sessions, amqp.events, order_id)


async def test_bridge_killed_between_starting_a_lifecycle_and_acking_its_placement(
    crash: CrashSystem, amqp: Subscriber, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = unique_id("crash-start")
    place = place_order(order_id)
    workflow = crash.temporal.get_workflow_handle(order_workflow_id(order_id))

    # the bridge records a command's outcome after applying it and before acking it
    record = insert(ProcessedCommand).values(
        command_id=place.command_id, order_id=order_id, type=place.type.value, outcome="accepted"
    )
    async with holding(db_sessions, record) as claim:
        await publish_until_confirmed(amqp.topology, place)
        await eventually(claim.someone_waits)
        started_run = (await workflow.describe()).run_id
        await crash.stack.crash_and_restart("bridge")

    await amqp.events.wait_for(order_id, EventType.AWAITING_APPROVAL)
    await publish_until_confirmed(amqp.topology, approve_order(order_id))
    await completed(amqp, [order_id])

    runs = [run.run_id async for run in crash.temporal.list_workflows(f'WorkflowId = "{workflow.id}"')]
    assert runs == [started_run]
    await assert_completed_once(db_sessions, amqp.events, order_id)
    async with db_sessions() as session:
        outcome = await session.scalar(
            select(col(ProcessedCommand.outcome)).where(col(ProcessedCommand.command_id) == place.command_id)
        )
    # the dead bridge's recording statement, blocked on our lock, still commits once the lock goes
    # (one autocommit statement: the server finishes it before it notices its client is gone), or
    # the redelivered placement finds its lifecycle running: either way the start counts once
    assert outcome in {"accepted", "duplicate"}


async def test_audit_killed_mid_batch_loses_and_repeats_nothing(
    crash: CrashSystem, amqp: Subscriber, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The audit consumer writes the events that arrived while it was busy in one transaction. With
    the audit table locked, two orders run to their end and their events pile up in the consumer.
    Then the second order's read-model row is locked and the table released: the consumer's next
    batch writes the first order's events and stops at the second's, uncommitted, when it is killed."""
    first, second = unique_id("crash-batch"), unique_id("crash-stop")

    async def all_delivered_to_audit() -> bool:
        queue = await amqp.channel.declare_queue(crash.settings.audit_queue, passive=True)
        return queue.declaration_result.message_count == 0

    async with AsyncExitStack() as holds:
        # inserts wait for this lock, reads do not
        table = await holds.enter_async_context(
            holding(db_sessions, text(f"LOCK TABLE {AuditEvent.__tablename__} IN SHARE ROW EXCLUSIVE MODE"))
        )
        for order_id in (first, second):
            await place_and_approve(amqp, [order_id])
            await completed(amqp, [order_id])
        await eventually(table.someone_waits)  # the consumer's first batch: the first `queued`
        await eventually(all_delivered_to_audit)  # every other event waits in the consumer
        second_row = await holds.enter_async_context(
            holding(db_sessions, select(col(Order.id)).where(col(Order.id) == second).with_for_update())
        )
        await table.release()
        await eventually(second_row.someone_waits)
        stored = [row.type for row in await audit_trail(db_sessions, first)]
        assert stored == ["queued"]  # the rest is written, uncommitted, by the batch in progress
        await crash.stack.crash_and_restart("audit")

    for order_id in (first, second):
        await assert_completed_once(db_sessions, amqp.events, order_id)


async def test_orders_in_flight_survive_a_worker_crash(
    crash: CrashSystem, amqp: Subscriber, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_ids = [unique_id("crash-worker") for _ in range(3)]
    for order_id in order_ids:
        await publish_until_confirmed(amqp.topology, place_order(order_id))
    for order_id in order_ids:
        await amqp.events.wait_for(order_id, EventType.AWAITING_APPROVAL)

    await crash.stack.crash_and_restart("workers")
    for order_id in order_ids:
        await publish_until_confirmed(amqp.topology, approve_order(order_id))

    await completed(amqp, order_ids)
    for order_id in order_ids:
        await assert_completed_once(db_sessions, amqp.events, order_id)


async def test_commands_wait_out_a_bridge_crash(crash: CrashSystem, amqp: Subscriber) -> None:
    order_id = unique_id("crash-bridge")

    await crash.stack.crash_and_restart("bridge")
    await place_and_approve(amqp, [order_id])

    await completed(amqp, [order_id])


# --- the servers restarted ------------------------------------------------------------------------


async def test_rabbitmq_restarted_while_the_services_run(
    crash: CrashSystem,
    amqp: Subscriber,
    api: httpx.AsyncClient,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    in_flight = [unique_id("crash-amqp-before") for _ in range(3)]
    over_http, over_amqp = unique_id("crash-amqp-http"), unique_id("crash-amqp-after")
    await place_and_approve(amqp, in_flight)
    for order_id in in_flight:  # approved: what is left of their lifecycles needs no command
        await amqp.events.wait_for(order_id, EventType.APPROVED)

    await crash.rabbitmq.stop()
    placement = place_order(over_http)
    body = order_body_of(placement)
    refused = await api.post("/orders", json=body)
    assert refused.status_code == 503, refused.text  # no broker, no promise
    # the running workers go on without the broker: the lifecycles in flight reach their end
    for order_id in in_flight:
        await eventually(lambda: lifecycle_ended(crash.temporal, order_id), timeout=LIFECYCLE_TIMEOUT)  # noqa: B023
    for consumer in ("workers", "bridge", "audit"):  # started while it is away, they wait for it
        await crash.stack.crash_and_restart(consumer)
    await crash.rabbitmq.start()
    broker_back_at = datetime.now(UTC)

    async def accepted() -> bool:
        response = await api.post("/orders", json=body)
        assert response.status_code in (202, 503), response.text
        return response.status_code == 202

    await eventually(accepted, timeout=LIFECYCLE_TIMEOUT)  # the gateway is connected again
    await publish_until_confirmed(amqp.topology, place_order(over_amqp))
    for order_id in (over_http, over_amqp):
        await amqp.events.wait_for(order_id, EventType.AWAITING_APPROVAL)
        await publish_until_confirmed(amqp.topology, approve_order(order_id))

    await completed(amqp, [*in_flight, over_http, over_amqp])
    for order_id in (*in_flight, over_http, over_amqp):
        await assert_completed_once(db_sessions, amqp.events, order_id)
    # and published those endings once it was back
    endings = [await amqp.events.wait_for_end(order_id) for order_id in in_flight]
    assert all(ending.occurred_at < broker_back_at for ending in endings)


async def test_postgres_restarted_while_the_services_run(
    crash: CrashSystem,
    amqp: Subscriber,
    api: httpx.AsyncClient,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    in_flight = [unique_id("crash-pg-before") for _ in range(3)]
    after = unique_id("crash-pg-after")
    await place_and_approve(amqp, in_flight)
    await amqp.events.wait_for(in_flight[0], EventType.PAYMENT_CHARGED)

    await crash.postgres.stop()
    readiness = await api.get("/readyz")
    assert (readiness.status_code, readiness.json()["failed"]) == (503, ["database"])
    await asyncio.sleep(OUTAGE_SECONDS)
    await crash.postgres.start()
    await place_and_approve(amqp, [after])

    await completed(amqp, [*in_flight, after])
    for order_id in (*in_flight, after):
        await assert_completed_once(db_sessions, amqp.events, order_id)


async def test_temporal_restarted_while_the_services_run(
    crash: CrashSystem, amqp: Subscriber, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    in_flight = [unique_id("crash-temporal-before") for _ in range(3)]
    after = unique_id("crash-temporal-after")
    await place_and_approve(amqp, in_flight)
    await amqp.events.wait_for(in_flight[0], EventType.APPROVED)  # the lifecycles are under way

    await crash.stack.crash_and_restart("temporal")
    await place_and_approve(amqp, [after])

    await completed(amqp, [*in_flight, after])
    for order_id in (*in_flight, after):
        await assert_completed_once(db_sessions, amqp.events, order_id)
