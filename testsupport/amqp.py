"""The broker's side of the tests: a channel and queues of the test's own, publishing, taking
messages and dead letters; its fixtures are loaded as a pytest plugin (tests/conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import aio_pika
import pytest_asyncio
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    HeadersType,
)

from devstack.stack import isolated_settings
from shared import broker
from shared.contracts import Command, OrderEvent
from shared.settings import Settings
from testsupport.orders import BROKER_USER
from testsupport.polling import TIMEOUT_SECONDS, eventually

Broker = tuple[AbstractChannel, broker.Topology]
"""A channel with orderflow's topology declared, as `broker.open_channel` returns it."""


@pytest_asyncio.fixture
async def broker_channel(base_settings: Settings) -> AsyncIterator[Broker]:
    """The test's own connection to the test vhost, with the topology declared."""
    connection = await broker.connect(base_settings, "tests")
    try:
        yield await broker.open_channel(connection)
    finally:
        await connection.close()


@pytest_asyncio.fixture
async def dead_letters(broker_channel: Broker) -> AbstractQueue:
    """orderflow's dead-letter queue."""
    channel, _ = broker_channel
    return await channel.declare_queue(broker.DEAD_LETTER_QUEUE, passive=True)


@pytest_asyncio.fixture
async def command_queue(broker_channel: Broker) -> AsyncIterator[AbstractQueue]:
    """A private queue that receives every command published to `orders.commands`."""
    channel, topology = broker_channel
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(topology.commands, routing_key="order.#")
    yield queue


def moved_to(settings: Settings, name: str) -> Settings:
    """The session's `settings` (identities, keys, publishers' roles) on a database and a vhost
    called `name`, made anew."""
    broker_root = urlunsplit(urlsplit(settings.amqp_url)._replace(path="/"))
    return isolated_settings(settings.model_copy(update={"amqp_url": broker_root}), name)


def own_queues(settings: Settings, **overrides: object) -> Settings:
    """`settings` with task queues and broker queues of the test's own (declared by whoever uses
    them), and `overrides`."""
    test_id = uuid4().hex[:12]
    queues = {
        "order_task_queue": f"order-tq-{test_id}",
        "shipping_task_queue": f"shipping-tq-{test_id}",
        "command_queue": f"test.commands.{test_id}",
        "placement_queue": f"test.placements.{test_id}",
        "audit_queue": f"test.audit.{test_id}",
    }
    return settings.model_copy(update={**queues, **overrides})


@contextmanager
def own_vhost(settings: Settings, name: str) -> Iterator[Settings]:
    """`settings` moved to a new RabbitMQ vhost called `name` plus a random suffix, where nothing is
    declared yet and nothing of other tests arrives; deleted afterwards."""
    ctl = shutil.which("rabbitmqctl")
    assert ctl, "rabbitmqctl is needed to create a vhost"
    vhost = f"{name}_{uuid4().hex[:8]}"
    subprocess.run([ctl, "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        [ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    try:
        yield settings.model_copy(update={"amqp_url": settings.amqp_url.rsplit("/", 1)[0] + "/" + vhost})
    finally:
        subprocess.run([ctl, "-q", "delete_vhost", vhost], check=True, capture_output=True)


@asynccontextmanager
async def consumer_queue(declared: Awaitable[AbstractQueue]) -> AsyncIterator[AbstractQueue]:
    """A service's queue, declared (as the service declares it) before the service starts, so
    nothing published early is lost; deleted afterwards."""
    queue = await declared
    try:
        yield queue
    finally:
        await queue.delete(if_unused=False, if_empty=False)


async def publish(to: Broker, *messages: Command | OrderEvent) -> None:
    """Publish commands and events, one after the other, as orderflow's services do."""
    _, topology = to
    for message in messages:
        if isinstance(message, OrderEvent):
            await broker.publish_event(topology, message)
        else:
            await broker.publish_command(topology, message)


async def publish_raw(
    exchange: AbstractExchange,
    routing_key: str,
    body: bytes,
    user_id: str | None = BROKER_USER,
    *,
    message_type: str | None = None,
    correlation_id: str | None = None,
    headers: HeadersType | None = None,
) -> str:
    """Publish a body as is (valid or not), as any client could; returns the message id it was given."""
    message_id = str(uuid4())
    message = aio_pika.Message(
        body=body,
        message_id=message_id,
        content_type="application/json",
        user_id=user_id,
        type=message_type,
        correlation_id=correlation_id,
        headers=headers,
    )
    await exchange.publish(message, routing_key=routing_key)
    return message_id


async def take_messages(
    queue: AbstractQueue,
    matching: Callable[[AbstractIncomingMessage], bool],
    count: int = 1,
    timeout: float = TIMEOUT_SECONDS,
) -> list[AbstractIncomingMessage]:
    """The first `count` messages of `queue` that match; those passed on the way are taken too."""
    taken: list[AbstractIncomingMessage] = []

    async def all_taken() -> bool:
        while len(taken) < count and (message := await queue.get(no_ack=True, fail=False)) is not None:
            if matching(message):
                taken.append(message)
        return len(taken) == count

    await eventually(all_taken, timeout)
    return taken


async def next_message(
    queue: AbstractQueue,
    matching: Callable[[AbstractIncomingMessage], bool],
    timeout: float = TIMEOUT_SECONDS,
) -> AbstractIncomingMessage:
    """The first message of `queue` that matches; those passed on the way are taken too."""
    [message] = await take_messages(queue, matching, 1, timeout)
    return message


async def drain(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Every message waiting in `queue` now."""
    taken = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    return taken


async def dead_lettered(
    dead_letters: AbstractQueue, message_ids: Collection[str]
) -> dict[str, AbstractIncomingMessage]:
    """The dead letters of these messages, by message id, once all have arrived."""
    messages = await take_messages(
        dead_letters, lambda message: message.message_id in message_ids, len(message_ids)
    )
    return {str(message.message_id): message for message in messages}


async def dead_letter_of(dead_letters: AbstractQueue, message_id: str) -> AbstractIncomingMessage:
    return (await dead_lettered(dead_letters, {message_id}))[message_id]


async def was_dead_lettered(dead_letters: AbstractQueue, message_id: str) -> bool:
    """Whether the message is among those waiting in the dead-letter queue now."""
    return message_id in [message.message_id for message in await drain(dead_letters)]


def verdict(dead_letter: AbstractIncomingMessage) -> tuple[object, object]:
    """Why a message was dead-lettered, and by which consumer."""
    headers = dead_letter.headers
    return headers[broker.REASON_HEADER], headers[broker.CONSUMER_HEADER]
