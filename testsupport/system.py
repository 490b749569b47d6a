"""The whole system as processes (the `make run` launcher) against the session's servers, and
every event it publishes; its fixtures are loaded as a pytest plugin (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID

import httpx
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from devstack.stack import running_stack
from shared import broker
from shared.admission_table import AdmissionStatus
from shared.contracts import EventType, OrderEvent
from shared.db import Admission, AuditEvent, create_engine
from shared.settings import Settings
from testsupport.orders import ADDRESS
from testsupport.polling import eventually
from testsupport.servers import unhurried

LIFECYCLE_TIMEOUT = 60.0  # generous: the contract's 15 s is measured by bench/lifecycle.py


@asynccontextmanager
async def running_system(settings: Settings, name: str) -> AsyncIterator[Settings]:
    """api, bridge, workers and audit as processes (the `make run` launcher), unhurried, against
    the session's database, vhost and dev server."""
    system_settings = unhurried(settings)
    await release_slots_left_held(settings)
    with tempfile.NamedTemporaryFile("w+", prefix=f"orderflow-{name}-", suffix=".log", delete=False) as log:
        try:
            async with running_stack(system_settings, temporal=None, log=log):
                yield system_settings
        finally:
            print(f"service logs: {log.name}")  # the services' own logs, for whoever reads a failure


async def release_slots_left_held(settings: Settings) -> None:
    """Admission slots earlier tests of the session left held: their lifecycles were never run, or
    ran on a task queue no worker polls any more, so the reconciler cannot end them, and they
    would take a system's admission bound (12 by default) before its first order."""
    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(Admission)
                .where(col(Admission.status).in_([AdmissionStatus.ADMITTING, AdmissionStatus.RUNNING]))
                .values(status=AdmissionStatus.ENDED.value, ended_at=func.now())
            )
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def system_settings(settings: Settings) -> Settings:
    """What the module's `system` runs with; a module overrides it to run the system otherwise."""
    return settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(
    system_settings: Settings, migrated_database: str, request: pytest.FixtureRequest
) -> AsyncIterator[Settings]:
    """The whole system, once per module; its settings."""
    async with running_system(system_settings, request.module.__name__) as running:
        yield running


class EventLog:
    """Every event on `orders.events` (through a queue of our own), by order, each event id once:
    delivery is at least once, and a redelivered event is the same event."""

    def __init__(self) -> None:
        self.by_order: dict[str, list[OrderEvent]] = {}
        self.repeats = 0
        self._seen: set[UUID] = set()
        self._changed = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        event = OrderEvent.model_validate_json(message.body)
        async with self._changed:
            if event.event_id in self._seen:
                self.repeats += 1
            else:
                self._seen.add(event.event_id)
                self.by_order.setdefault(event.order_id, []).append(event)
                self._changed.notify_all()
        await message.ack()

    def of(self, order_id: str, type_: EventType) -> list[OrderEvent]:
        return [e for e in self.by_order.get(order_id, []) if e.type is type_]

    async def wait_for(self, order_id: str, *types: EventType) -> OrderEvent:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: any(e.type in types for e in self.by_order.get(order_id, []))),
                LIFECYCLE_TIMEOUT,
            )
        return next(e for e in self.by_order[order_id] if e.type in types)

    async def wait_for_end(self, order_id: str) -> OrderEvent:
        return await self.wait_for(order_id, EventType.COMPLETED, EventType.CANCELLED, EventType.FAILED)


@asynccontextmanager
async def following_events(
    system: Settings,
) -> AsyncIterator[tuple[broker.Topology, EventLog, AbstractQueue]]:
    """A connection to the system's broker with the topology, every event collected, and the
    dead-letter queue."""
    connection = await broker.connect(system, "e2e-tests")
    try:
        channel, topology = await broker.open_channel(connection)
        events = EventLog()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(topology.events, routing_key="order.#")
        await queue.consume(events.on_message)
        dead_letters = await channel.declare_queue(broker.DEAD_LETTER_QUEUE, passive=True)
        yield topology, events, dead_letters
    finally:
        await connection.close()


@pytest_asyncio.fixture(loop_scope="session")
async def amqp(system: Settings) -> AsyncIterator[tuple[broker.Topology, EventLog, AbstractQueue]]:
    """The running system's broker, as `following_events` gives it."""
    async with following_events(system) as followed:
        yield followed


async def place_over_http(api: httpx.AsyncClient, order_id: str) -> None:
    response = await api.post(
        "/orders",
        json={
            "order_id": order_id,
            "payment_id": f"pay-{order_id}",
            "items": [{"sku": "BOOK-1", "qty": 1}],
            "address": ADDRESS,
        },
    )
    assert response.status_code == 202, response.text


async def audit_trail(sessions: async_sessionmaker[AsyncSession], order_id: str) -> list[AuditEvent]:
    async with sessions() as session:
        rows = await session.scalars(
            select(AuditEvent).where(col(AuditEvent.order_id) == order_id).order_by(col(AuditEvent.seq))
        )
        return list(rows)


async def full_trail_stored(
    sessions: async_sessionmaker[AsyncSession], events: EventLog, order_id: str
) -> list[AuditEvent]:
    """The audit table's rows once it holds every event published for the order."""
    expected = len(events.by_order[order_id])

    async def trail_if_complete() -> list[AuditEvent] | None:
        trail = await audit_trail(sessions, order_id)
        return trail if len(trail) >= expected else None

    return await eventually(trail_if_complete, timeout=LIFECYCLE_TIMEOUT)
