"""End to end: the real services as processes (the same launcher as `make run`), real RabbitMQ,
PostgreSQL and a Temporal dev server, and the real fault injector.

Orders go in over HTTP and straight over AMQP; approvals go through the command queue; what comes
out is checked on `orders.events` and in the audit table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from uuid import uuid4

import httpx
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractQueue
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import broker
from shared.contracts import (
    EventType,
    OrderEvent,
    Role,
)
from shared.settings import Settings
from testsupport.amqp import publish_raw, take_messages
from testsupport.gateway import bearer
from testsupport.orders import ADDRESS, approve_order, place_order, unique_id
from testsupport.system import EventLog, full_trail_stored, place_over_http

pytestmark = pytest.mark.e2e


@pytest_asyncio.fixture(loop_scope="session")
async def api(system: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """As an operator: it places, reads every order, re-addresses and cancels."""
    headers = bearer(system, "e2e-operator", Role.OPERATOR)
    async with httpx.AsyncClient(base_url=system.api_url, timeout=10, headers=headers) as client:
        yield client


async def test_orders_over_http_and_amqp_reach_completed_with_a_gapless_audit_trail(
    amqp: tuple[broker.Topology, EventLog, AbstractQueue],
    api: httpx.AsyncClient,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    topology, events, _ = amqp
    over_http = [unique_id("e2e-http") for _ in range(3)]
    over_amqp = [unique_id("e2e-amqp") for _ in range(3)]
    for order_id in over_http:
        await place_over_http(api, order_id)
    for order_id in over_amqp:
        await broker.publish_command(topology, place_order(order_id))

    async def approve_when_asked(order_id: str) -> OrderEvent:
        await events.wait_for(order_id, EventType.AWAITING_APPROVAL)
        await broker.publish_command(topology, approve_order(order_id))
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
    order_id = unique_id("e2e-cancel")
    await place_over_http(api, order_id)
    await events.wait_for(order_id, EventType.AWAITING_APPROVAL)

    new_address = {**ADDRESS, "line1": "1 New Street", "postal_code": "EC1A 1BB"}
    response = await api.post(f"/orders/{order_id}/address", json={"address": new_address})
    assert response.status_code == 202, response.text
    updated = await events.wait_for(order_id, EventType.ADDRESS_UPDATED)
    assert updated.data.model_dump(mode="json")["address"]["line1"] == "1 New Street"

    response = await api.post(f"/orders/{order_id}/cancel", json={"reason": "changed my mind"})
    assert response.status_code == 202, response.text
    ending = await events.wait_for_end(order_id)

    assert ending.type is EventType.CANCELLED
    assert ending.data.model_dump(mode="json") == {"reason": "changed my mind", "refunded": False}
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

    order_id = unique_id("e2e-after-poison")
    await broker.publish_command(topology, place_order(order_id))
    received = await events.wait_for(order_id, EventType.RECEIVED)
    assert received.seq == 3  # after `queued` and `admitted`


async def test_a_duplicate_command_id_has_one_effect(
    amqp: tuple[broker.Topology, EventLog, AbstractQueue],
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    topology, events, _ = amqp
    order_id = unique_id("e2e-dup")
    place = place_order(order_id)
    await broker.publish_command(topology, place)
    await broker.publish_command(topology, place)
    await events.wait_for(order_id, EventType.AWAITING_APPROVAL)

    approve = approve_order(order_id)
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
