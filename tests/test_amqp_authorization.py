"""Commands over AMQP are authorized: the issuer is the publisher's broker-validated `user_id`.

The whole system runs as processes (the `make run` launcher). Besides the tests' own broker user
(a delegate with every role, as the local account is under `make run`), broker users of this
module's own publish: one with the customer role only and one with none, both not delegates.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.exceptions import ChannelClosed
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import broker
from shared.authorization import FORBIDDEN
from shared.contracts import (
    Actor,
    Command,
    EventType,
    OrderEvent,
    OrderState,
    PlaceOrder,
    Role,
)
from shared.db import Order
from shared.settings import Settings
from testsupport.amqp import publish_raw
from testsupport.orders import GUEST, TEST_REVIEWER, approve_order, cancel_order, place_order, unique_id
from testsupport.polling import eventually
from testsupport.system import EventLog, following_events

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to add broker users"),
]

SUFFIX = secrets.token_hex(4)
CUSTOMER_USER = f"orderflow-test-customer-{SUFFIX}"
"""A broker user with the customer role: it places orders, never approves them."""
NOBODY_USER = f"orderflow-test-nobody-{SUFFIX}"
"""A broker user orderflow gives no role."""
ALICE = Actor(subject="alice", roles=frozenset({Role.CUSTOMER, Role.REVIEWER}))


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def broker_users(settings: Settings) -> Iterator[dict[str, str]]:
    """This module's broker users, by name, with their passwords, allowed everything on the vhost
    (what orderflow lets them do is the bridge's business here)."""
    vhost = urlsplit(settings.amqp_url).path.lstrip("/") or "/"
    users = {CUSTOMER_USER: secrets.token_urlsafe(16), NOBODY_USER: secrets.token_urlsafe(16)}
    for user, password in users.items():
        rabbitmqctl("add_user", user, password)
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    try:
        yield users
    finally:
        for user in users:
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], check=False, capture_output=True)


@pytest.fixture(scope="module")
def system_settings(settings: Settings, broker_users: dict[str, str]) -> Settings:
    """The system of this module gives its customer broker user the customer role."""
    roles = {**settings.amqp_publisher_roles, CUSTOMER_USER: [Role.CUSTOMER]}
    return settings.model_copy(update={"amqp_publisher_roles": roles})


@pytest_asyncio.fixture(loop_scope="session")
async def followed(system: Settings) -> AsyncIterator[tuple[broker.Topology, EventLog]]:
    async with following_events(system) as (topology, events, _):
        yield topology, events


@asynccontextmanager
async def publisher(
    system: Settings, broker_users: dict[str, str], user: str
) -> AsyncIterator[broker.Topology]:
    """A confirming channel of a connection as `user`, whose messages carry it as `user_id`."""
    url = urlsplit(system.amqp_url)
    netloc = f"{quote(user, safe='')}:{quote(broker_users[user], safe='')}@{url.hostname}:{url.port or 5672}"
    connection = await aio_pika.connect_robust(urlunsplit(url._replace(netloc=netloc)))
    try:
        _, topology = await broker.open_channel(connection)
        yield topology
    finally:
        await connection.close()


async def rejection_of(events: EventLog, command: Command) -> OrderEvent:
    async def rejected() -> OrderEvent | None:
        found = [
            e
            for e in events.of(command.order_id, EventType.COMMAND_REJECTED)
            if e.command_id == command.command_id
        ]
        return found[0] if found else None

    return await eventually(rejected, timeout=30)


def assert_forbidden(rejection: OrderEvent, command: Command) -> None:
    assert rejection.data.model_dump(mode="json")["reason"] == FORBIDDEN
    assert rejection.data.model_dump(mode="json")["command_type"] == command.type.value
    assert rejection.data.model_dump(mode="json")["detail"]  # what a person reads about it


async def forbidden_when_sent(topology: broker.Topology, events: EventLog, command: Command) -> None:
    """Publish `command` and see it rejected as forbidden."""
    await broker.publish_command(topology, command)
    assert_forbidden(await rejection_of(events, command), command)


async def read_model(sessions: async_sessionmaker[AsyncSession], order_id: str) -> Order | None:
    async with sessions() as session:
        return await session.get(Order, order_id, populate_existing=True)


async def placed_and_in_review(topology: broker.Topology, events: EventLog, place: PlaceOrder) -> None:
    await broker.publish_command(topology, place)
    await events.wait_for(place.order_id, EventType.AWAITING_APPROVAL)


async def test_the_broker_refuses_a_publish_that_forges_its_user_id(
    system: Settings, broker_users: dict[str, str]
) -> None:
    async with publisher(system, broker_users, CUSTOMER_USER) as topology:
        forged = place_order(unique_id("forged"), issued_by=None)
        with pytest.raises(ChannelClosed):
            await topology.commands.publish(
                aio_pika.Message(body=forged.model_dump_json().encode(), user_id=GUEST.subject),
                routing_key="order.place",
            )


async def test_a_command_without_user_id_is_forbidden_and_changes_nothing(
    followed: tuple[broker.Topology, EventLog], db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    topology, events = followed
    place = place_order(unique_id("anonymous"), issued_by=None)
    await publish_raw(topology.commands, "order.place", place.model_dump_json().encode(), user_id=None)

    assert_forbidden(await rejection_of(events, place), place)
    assert await read_model(db_sessions, place.order_id) is None
    assert [e.type for e in events.by_order[place.order_id]] == [EventType.COMMAND_REJECTED]


@pytest.mark.parametrize(
    ("user", "issued_by"),
    [
        pytest.param(NOBODY_USER, None, id="a_broker_user_without_a_role_cannot_place"),
        pytest.param(CUSTOMER_USER, ALICE, id="a_non_delegate_naming_someone_else_is_forbidden"),
    ],
)
async def test_a_placement_the_broker_user_may_not_make_is_forbidden(
    system: Settings,
    broker_users: dict[str, str],
    followed: tuple[broker.Topology, EventLog],
    db_sessions: async_sessionmaker[AsyncSession],
    user: str,
    issued_by: Actor | None,
) -> None:
    _, events = followed
    place = place_order(unique_id("forbidden"), issued_by=issued_by)
    async with publisher(system, broker_users, user) as topology:
        await forbidden_when_sent(topology, events, place)
    assert await read_model(db_sessions, place.order_id) is None


async def test_a_broker_user_without_the_reviewer_role_cannot_approve(
    system: Settings,
    broker_users: dict[str, str],
    followed: tuple[broker.Topology, EventLog],
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    tests_topology, events = followed
    order_id = unique_id("customer")
    async with publisher(system, broker_users, CUSTOMER_USER) as topology:
        await placed_and_in_review(topology, events, place_order(order_id, issued_by=None))
        await forbidden_when_sent(topology, events, approve_order(order_id, issued_by=None))
        # and it cannot name a reviewer instead: it is not a delegate
        await forbidden_when_sent(topology, events, approve_order(order_id, issued_by=TEST_REVIEWER))

    await asyncio.sleep(1)  # had either applied, its `approved` would be out by now
    assert events.of(order_id, EventType.APPROVED) == []
    order = await read_model(db_sessions, order_id)
    assert order is not None
    assert (order.state, order.placed_by, order.approved_by) == (
        OrderState.AWAITING_APPROVAL.value,
        CUSTOMER_USER,
        None,
    )
    cancel = cancel_order(order_id, issued_by=None)
    await broker.publish_command(tests_topology, cancel)  # as an operator: the order ends
    assert (await events.wait_for_end(order_id)).type is EventType.CANCELLED


async def test_four_eyes_and_the_approver_recorded(
    followed: tuple[broker.Topology, EventLog], db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    topology, events = followed
    order_id = unique_id("four-eyes")
    # the tests' broker user is a delegate: it acts for the people it names
    await placed_and_in_review(topology, events, place_order(order_id, issued_by=ALICE))
    await forbidden_when_sent(topology, events, approve_order(order_id, issued_by=ALICE))
    approval = approve_order(order_id, issued_by=TEST_REVIEWER)
    await broker.publish_command(topology, approval)

    assert (await events.wait_for_end(order_id)).type is EventType.COMPLETED
    [approved] = events.of(order_id, EventType.APPROVED)
    assert (approved.command_id, approved.data.model_dump(mode="json")["approved_by"]) == (
        approval.command_id,
        TEST_REVIEWER.subject,
    )
    [received] = events.of(order_id, EventType.QUEUED)
    assert received.data.model_dump(mode="json")["placed_by"] == ALICE.subject

    async def recorded() -> Order | None:
        order = await read_model(db_sessions, order_id)
        return order if order is not None and order.state == OrderState.COMPLETED.value else None

    order = await eventually(recorded, timeout=30)
    assert (order.placed_by, order.approved_by) == (ALICE.subject, TEST_REVIEWER.subject)
