"""Least privilege on the broker: each service's own user, as `make run` creates it, can do what the
service does and nothing more (on a vhost and with users of this module's own)."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused

from services.api.connections import open_broker
from shared import broker
from shared.broker_users import ACCOUNTS, account_url, password_file, set_up_accounts
from shared.contracts import (
    Address,
    EventType,
    OrderEvent,
    OrderItem,
    PlaceOrder,
    PlaceOrderPayload,
)
from shared.settings import Settings
from testsupport.orders import example_event, unique_id
from testsupport.polling import eventually
from testsupport.session import session_name

VHOST = session_name("orderflow_test_permissions")
PREFIX = session_name("orderflow-test", "-") + "-"
ConnectAs = Callable[[str], Awaitable[tuple[Settings, AbstractRobustConnection]]]
"""Connects as one of the service users: its settings and its connection."""


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=False, capture_output=True)


@pytest.fixture(scope="module")
def admin_settings() -> Settings:
    """guest (full rights) on a vhost of this module's own, with the default queue names."""
    rabbitmqctl("delete_vhost", VHOST)
    rabbitmqctl("add_vhost", VHOST)
    rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    return Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")


@pytest_asyncio.fixture(scope="module")
async def accounts(
    admin_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[dict[str, dict[str, str]], Path]]:
    """What `make run` does: the users, their password files and the topology; each service's
    ORDERFLOW_AMQP_* variables."""
    secrets_dir = tmp_path_factory.mktemp("broker-secrets")
    environments = await set_up_accounts(admin_settings, secrets_dir, PREFIX)
    yield environments, secrets_dir
    for account in ACCOUNTS:
        rabbitmqctl("delete_user", PREFIX + account)
    rabbitmqctl("delete_vhost", VHOST)


def settings_of(admin_settings: Settings, environment: dict[str, str]) -> Settings:
    return Settings(
        amqp_url=environment["ORDERFLOW_AMQP_URL"],
        amqp_password_file=Path(environment["ORDERFLOW_AMQP_PASSWORD_FILE"]),
    )


@pytest_asyncio.fixture
async def connect_as(
    admin_settings: Settings, accounts: tuple[dict[str, dict[str, str]], Path]
) -> AsyncIterator[ConnectAs]:
    """A connection as a service's user (`api`, `bridge`, `workers`, `audit`, or `operator`)."""
    environments, secrets_dir = accounts
    opened: list[AbstractRobustConnection] = []

    async def connect(service: str) -> tuple[Settings, AbstractRobustConnection]:
        environment = environments.get(service) or {
            "ORDERFLOW_AMQP_URL": account_url(admin_settings.amqp_url, service, PREFIX),
            "ORDERFLOW_AMQP_PASSWORD_FILE": str(password_file(secrets_dir, service)),
        }
        settings = settings_of(admin_settings, environment)
        connection = await broker.connect(settings, f"tests-{service}", patience=10)
        opened.append(connection)
        return settings, connection

    yield connect
    for connection in opened:
        await connection.close()


@pytest_asyncio.fixture
async def admin(admin_settings: Settings, accounts: object) -> AsyncIterator[AbstractChannel]:
    connection = await broker.connect(admin_settings, "tests-admin")
    async with connection:
        yield await connection.channel()


async def refused(
    connection: AbstractRobustConnection, operation: Callable[[AbstractChannel], Awaitable[Any]]
) -> None:
    """`operation`, on a channel of its own (the broker closes it), is refused for lack of permission."""
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(ChannelAccessRefused):
        await operation(channel)


def publish_to(
    exchange: str, routing_key: str = "order.received"
) -> Callable[[AbstractChannel], Awaitable[Any]]:
    async def publish(channel: AbstractChannel) -> Any:
        target = await channel.get_exchange(exchange, ensure=False)
        return await target.publish(aio_pika.Message(b"{}"), routing_key=routing_key)

    return publish


def consume(queue: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
    async def take(channel: AbstractChannel) -> Any:
        return await (await channel.get_queue(queue, ensure=False)).get(fail=False)

    return take


async def declare_queue(channel: AbstractChannel) -> Any:
    return await channel.declare_queue(f"intruder-{uuid4().hex}", durable=True)


async def delete_queue(channel: AbstractChannel) -> Any:
    return await channel.queue_delete(Settings().audit_queue)


def an_event() -> OrderEvent:
    return example_event(unique_id("perm"), 1, EventType.RECEIVED)


def a_placement() -> PlaceOrder:
    address = Address(name="Ada", line1="1 Main St", city="Springfield", postal_code="12345", country="US")
    payload = PlaceOrderPayload(
        payment_id=f"pay-{uuid4().hex[:8]}", items=[OrderItem(sku="s", qty=1)], address=address
    )
    return PlaceOrder(
        command_id=uuid4(), order_id=f"perm-{uuid4().hex[:8]}", issued_at=now(), payload=payload
    )


def now() -> datetime:
    return datetime.now(UTC)


def test_passwords_are_kept_private(accounts: tuple[dict[str, dict[str, str]], Path]) -> None:
    _, secrets_dir = accounts
    for account in ACCOUNTS:
        mode = password_file(secrets_dir, account).stat().st_mode
        assert stat.S_IMODE(mode) == 0o600


async def test_the_gateway_publishes_commands_and_nothing_else(
    connect_as: ConnectAs, admin: AbstractChannel
) -> None:
    settings, connection = await connect_as("api")
    # the gateway's own start-up: its queues are found without configure permission
    link = await open_broker(settings)
    try:
        command = a_placement()
        await broker.publish_command(link.topology, command)
    finally:
        await link.connection.close()
    placements = await admin.get_queue(settings.placement_queue)
    arrived = await eventually(lambda: placements.get(no_ack=True, fail=False))
    assert arrived.message_id == str(command.command_id)
    assert arrived.user_id == f"{PREFIX}gateway"

    await refused(connection, publish_to(broker.EVENTS_EXCHANGE))
    await refused(connection, publish_to(broker.DEAD_LETTER_EXCHANGE))
    await refused(connection, consume(settings.audit_queue))
    await refused(connection, consume(settings.placement_queue))
    await refused(connection, declare_queue)
    await refused(connection, delete_queue)


async def test_the_workers_publish_events_and_nothing_else(
    connect_as: ConnectAs, admin: AbstractChannel
) -> None:
    settings, connection = await connect_as("workers")
    channel, topology = await broker.open_channel(connection)
    await broker.declare_audit_queue(channel, topology, settings)
    event = an_event()
    await broker.publish_event(topology, event)
    audit_queue = await admin.get_queue(settings.audit_queue)
    arrived = await eventually(lambda: audit_queue.get(no_ack=True, fail=False))
    assert arrived.message_id == str(event.event_id)

    await refused(connection, publish_to(broker.COMMANDS_EXCHANGE, "order.place"))
    await refused(connection, consume(settings.audit_queue))
    await refused(connection, declare_queue)


async def test_the_audit_consumer_reads_its_queue_and_nothing_else(
    connect_as: ConnectAs, admin: AbstractChannel
) -> None:
    settings, connection = await connect_as("audit")
    events = await admin.get_exchange(broker.EVENTS_EXCHANGE)
    event = an_event()
    await events.publish(aio_pika.Message(event.model_dump_json().encode()), routing_key="order.received")
    channel, topology = await broker.open_channel(connection)
    queue = await broker.declare_audit_queue(channel, topology, settings)
    delivered = await eventually(lambda: queue.get(fail=False))
    # what it does with a message it gives up on
    await broker.dead_letter(topology, delivered, consumer="audit", reason="test", error="test")

    await refused(connection, publish_to(broker.EVENTS_EXCHANGE))
    await refused(connection, consume(settings.placement_queue))
    await refused(connection, consume(broker.DEAD_LETTER_QUEUE))


async def test_the_bridge_reads_commands_and_publishes_events(connect_as: ConnectAs) -> None:
    settings, connection = await connect_as("bridge")
    channel, topology = await broker.open_channel(connection)
    _, commands = await broker.declare_command_queues(channel, topology, settings)
    await commands.get(fail=False)
    await broker.publish_event(topology, an_event())

    await refused(connection, consume(settings.audit_queue))
    await refused(connection, publish_to(broker.COMMANDS_EXCHANGE, "order.place"))
    await refused(connection, declare_queue)


async def test_the_operator_replays_dead_letters_and_reads_nothing_else(connect_as: ConnectAs) -> None:
    _, connection = await connect_as("operator")
    channel, _ = await broker.open_channel(connection)
    await (await channel.get_queue(broker.DEAD_LETTER_QUEUE)).get(fail=False)
    await publish_to(broker.COMMANDS_EXCHANGE, "order.unrouted")(channel)

    await refused(connection, consume(Settings().audit_queue))
    await refused(connection, declare_queue)


async def test_a_user_that_may_not_declare_says_what_is_missing(connect_as: ConnectAs) -> None:
    settings, connection = await connect_as("api")
    channel, topology = await broker.open_channel(connection)
    unprovisioned = settings.model_copy(update={"placement_queue": f"missing-{uuid4().hex}"})
    with pytest.raises(broker.TopologyMissing) as missing:
        await broker.declare_command_queues(channel, topology, unprovisioned)
    assert "\n" not in str(missing.value)
    assert unprovisioned.placement_queue in str(missing.value)
    assert "orderflow broker provision" in str(missing.value)
