"""End to end: the real services as processes (the same launcher as `make run`), real RabbitMQ,
PostgreSQL and a Temporal dev server, and the real fault injector.

Orders go in over HTTP and straight over AMQP; approvals go through the command queue; what comes
out is checked on `orders.events` and in the audit table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from uuid import UUID, uuid4

import httpx
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from api_support import bearer, running_system
from service_support import TEST_REVIEWER, eventually, publish_raw, take_messages
from shared import broker
from shared.contracts import (
    Address,
    ApproveOrder,
    EventType,
    OrderEvent,
    OrderItem,
    PlaceOrder,
    PlaceOrderPayload,
    Role,
)
from shared.db import AuditEvent
from shared.settings import Settings

pytestmark = pytest.mark.e2e

LIFECYCLE_TIMEOUT = 60.0  # generous: the contract's 15 s is measured by bench/lifecycle.py
ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


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


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(settings: Settings, migrated_database: str) -> AsyncIterator[Settings]:
    async with running_system(settings, "e2e") as system_settings:
        yield system_settings


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
    async with following_events(system) as followed:
        yield followed


@pytest_asyncio.fixture(loop_scope="session")
async def api(system: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """As an operator: it places, reads every order, re-addresses and cancels."""
    headers = bearer(system, "e2e-operator", Role.OPERATOR)
    async with httpx.AsyncClient(base_url=system.api_url, timeout=10, headers=headers) as client:
        yield client


def place_command(order_id: str, command_id: UUID | None = None) -> PlaceOrder:
    return PlaceOrder(
        command_id=command_id or uuid4(),
        order_id=order_id,
        issued_at=datetime.now(UTC),
        payload=PlaceOrderPayload(
            payment_id=f"pay-{order_id}",
            items=[OrderItem(sku="BOOK-1", qty=2, unit_price_cents=1250)],
            address=Address.model_validate(ADDRESS),
        ),
    )


def approve_command(order_id: str, command_id: UUID | None = None) -> ApproveOrder:
    """By a reviewer the tests' broker user (a delegate) names: it placed the order (four eyes)."""
    return ApproveOrder(
        command_id=command_id or uuid4(),
        order_id=order_id,
        issued_at=datetime.now(UTC),
        issued_by=TEST_REVIEWER,
    )


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
    return await eventually(
        lambda: _trail_if_complete(sessions, order_id, expected), timeout=LIFECYCLE_TIMEOUT
    )


async def _trail_if_complete(
    sessions: async_sessionmaker[AsyncSession], order_id: str, expected: int
) -> list[AuditEvent] | None:
    trail = await audit_trail(sessions, order_id)
    return trail if len(trail) >= expected else None


async def test_orders_over_http_and_amqp_reach_completed_with_a_gapless_audit_trail(
    amqp: tuple[broker.Topology, EventLog, AbstractQueue],
    api: httpx.AsyncClient,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    topology, events, _ = amqp
    over_http = [f"e2e-http-{uuid4().hex[:8]}" for _ in range(3)]
    over_amqp = [f"e2e-amqp-{uuid4().hex[:8]}" for _ in range(3)]
    for order_id in over_http:
        await place_over_http(api, order_id)
    for order_id in over_amqp:
        await broker.publish_command(topology, place_command(order_id))

    async def approve_when_asked(order_id: str) -> OrderEvent:
        await events.wait_for(order_id, EventType.AWAITING_APPROVAL)
        await broker.publish_command(topology, approve_command(order_id))
        return await events.wait_for_end(order_id)

    endings = await asyncio.gather(*(approve_when_asked(o) for o in over_http + over_amqp))

    assert [e.type for e in endings] == [EventType.COMPLETED] * 6, [e.data for e in endings]
    for order_id in over_http + over_amqp:
        trail = await full_trail_stored(db_sessions, events, order_id)
        assert [row.seq for row in trail] == list(range(1, len(trail) + 1))
        assert len({row.event_id for row in trail}) == len(trail)
        kinds = [row.type for row in trail]
        assert kinds[:6] == ["queued", "admitted", "received", "validated", "awaiting_approval", "approved"]
        assert kinds[-2:] == ["shipped", "completed"]
        assert {"payment_charged", "package_prepared", "carrier_dispatched"} <= set(kinds)

    status = (await api.get(f"/orders/{over_http[0]}")).json()
    assert status["state"] == "completed"
    assert status["tracking_number"]
    listed = (await api.get("/orders", params={"state": "completed", "limit": 200})).json()
    listed_ids = {order["order_id"] for order in listed["items"]}
    assert set(over_http + over_amqp) <= listed_ids


async def test_address_update_and_cancel_through_the_api(
    amqp: tuple[broker.Topology, EventLog, AbstractQueue],
    api: httpx.AsyncClient,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    _, events, _ = amqp
    order_id = f"e2e-cancel-{uuid4().hex[:8]}"
    await place_over_http(api, order_id)
    await events.wait_for(order_id, EventType.AWAITING_APPROVAL)

    new_address = {**ADDRESS, "line1": "1 New Street", "postal_code": "EC1A 1BB"}
    response = await api.post(f"/orders/{order_id}/address", json={"address": new_address})
    assert response.status_code == 202, response.text
    updated = await events.wait_for(order_id, EventType.ADDRESS_UPDATED)
    assert updated.data["address"]["line1"] == "1 New Street"

    response = await api.post(f"/orders/{order_id}/cancel", json={"reason": "changed my mind"})
    assert response.status_code == 202, response.text
    ending = await events.wait_for_end(order_id)

    assert ending.type is EventType.CANCELLED
    assert ending.data == {"reason": "changed my mind", "refunded": False}
    assert str(ending.command_id) == response.json()["command_id"]
    trail = await full_trail_stored(db_sessions, events, order_id)
    assert [row.type for row in trail][-2:] == ["address_updated", "cancelled"]
    status = (await api.get(f"/orders/{order_id}")).json()
    assert status["state"] == "cancelled"
    assert status["address"]["line1"] == "1 New Street"


async def test_malformed_and_invalid_commands_are_dead_lettered_and_the_bridge_keeps_serving(
    amqp: tuple[broker.Topology, EventLog, AbstractQueue],
) -> None:
    topology, events, dead_letters = amqp
    not_json = await publish_raw(topology.commands, "order.place", b"{this is not json")
    invalid = await publish_raw(
        topology.commands,
        "order.place",
        json.dumps(
            {
                "command_id": str(uuid4()),
                "type": "PlaceOrder",
                "order_id": "bad id!",
                "issued_at": "yesterday",
                "payload": {},
            }
        ).encode(),
    )

    letters = await take_messages(dead_letters, lambda m: m.message_id in {not_json, invalid}, count=2)
    reasons = {m.message_id: m.headers[broker.REASON_HEADER] for m in letters}
    assert reasons == {not_json: "invalid_json", invalid: "schema_invalid"}
    assert all(m.headers[broker.ERROR_HEADER] for m in letters)

    order_id = f"e2e-after-poison-{uuid4().hex[:8]}"
    await broker.publish_command(topology, place_command(order_id))
    received = await events.wait_for(order_id, EventType.RECEIVED)
    assert received.seq == 3  # after `queued` and `admitted`


async def test_a_duplicate_command_id_has_one_effect(
    amqp: tuple[broker.Topology, EventLog, AbstractQueue],
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    topology, events, _ = amqp
    order_id = f"e2e-dup-{uuid4().hex[:8]}"
    place = place_command(order_id)
    await broker.publish_command(topology, place)
    await broker.publish_command(topology, place)
    await events.wait_for(order_id, EventType.AWAITING_APPROVAL)

    approve = approve_command(order_id)
    await broker.publish_command(topology, approve)
    await broker.publish_command(topology, approve)
    ending = await events.wait_for_end(order_id)

    assert ending.type is EventType.COMPLETED
    trail = await full_trail_stored(db_sessions, events, order_id)
    kinds = [row.type for row in trail]
    assert kinds.count("received") == 1
    assert kinds.count("approved") == 1
    assert "command_rejected" not in kinds
    assert events.of(order_id, EventType.COMMAND_REJECTED) == []
